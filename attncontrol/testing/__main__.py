"""``python -m attncontrol.testing DIR``: write a tiny random pipeline folder (no download)."""

from __future__ import annotations

import argparse

from . import FAMILIES, save_tiny_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attncontrol.testing", description="Write a tiny random pipeline folder (no download)."
    )
    parser.add_argument("folder")
    parser.add_argument("--family", choices=FAMILIES, default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = save_tiny_pipeline(args.folder, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
