"""``python -m attncontrol.shapes train --out DIR`` (train the shapes model) and ``draw`` (render scenes)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attncontrol.shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the shapes model into a new pipeline folder")
    tr.add_argument("--out", required=True, help="a new folder for the pipeline (diffusers layout, safetensors)")
    tr.add_argument("--images", type=int, default=30000, help="training scenes drawn once (default 30000)")
    tr.add_argument("--vae-steps", type=int, default=400, help="VAE steps, batch 16 (default 400)")
    tr.add_argument("--steps", type=int, default=4000, help="UNet + text encoder steps (default 4000)")
    tr.add_argument("--batch", type=int, default=32, help="UNet batch size (default 32)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    cu = sub.add_parser("curve", help="the training curve of a trained folder (its training_log.csv), as a table")
    cu.add_argument("model", nargs="?", default="shapes", help="a trained folder (default: the shipped model)")
    cu.add_argument("--every", type=int, default=500, help="one row per this many steps (default 500)")
    dr = sub.add_parser("draw", help="draw random scenes of the world into a folder (PNG + truth JSON)")
    dr.add_argument("--out", required=True)
    dr.add_argument("--n", type=int, default=16)
    dr.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import train

        try:
            out = train(
                args.out,
                images=args.images,
                vae_steps=args.vae_steps,
                steps=args.steps,
                batch=args.batch,
                seed=args.seed,
                threads=args.threads,
            )
        except FileExistsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0
    if args.command == "curve":
        if args.every < 1:
            parser.error(f"--every must be >= 1, got {args.every}")
        return _curve(args.model, args.every)
    import json
    from pathlib import Path

    import numpy as np

    from . import world

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for i in range(args.n):
        scene = world.training_scene(rng, exclude=set())
        world.draw(scene).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.json").write_text(json.dumps(scene.truth()) + "\n", encoding="utf-8")
    print(f"wrote {args.n} scenes to {folder}")
    return 0


def _curve(model: str, every: int) -> int:
    """Mean logged loss per ``every`` steps of each stage, with the elapsed time at the window's end."""
    import csv
    from pathlib import Path

    from . import resolve_model

    path = Path(resolve_model(model)) / "training_log.csv"
    if not path.is_file():
        print(f"error: {path} not found (is {model!r} a folder written by `train`?)", file=sys.stderr)
        return 2
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    print("| stage | steps | mean loss | minutes |\n|---|---|---|---|")
    for stage in dict.fromkeys(r["stage"] for r in rows):
        windows: dict[int, list[dict]] = {}
        for r in rows:
            if r["stage"] == stage:
                windows.setdefault(int(r["step"]) // every, []).append(r)
        last = max(int(r["step"]) for r in rows if r["stage"] == stage) + 1
        for w, group in windows.items():
            loss = sum(float(r["loss"]) for r in group) / len(group)
            end = min(w * every + every, last)
            print(f"| {stage} | {w * every}-{end} | {loss:.4f} | {float(group[-1]['seconds']) / 60:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
