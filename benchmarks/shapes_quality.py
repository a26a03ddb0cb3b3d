"""Quality of every method on the shipped shapes model, scored by the shapes world's detector (no weights): one
table, per method, of both subjects' shapes present, both colours bound, the relation right (spatial prompts),
the IoU of each subject with its layout box (box methods), and seconds per image, each with its 95% bootstrap
interval, and the paired difference from plain sampling (same prompts, same seeds) with its sign-flip p-value.

    python benchmarks/shapes_quality.py --out shapes-bench [--sets shapes-two,shapes-spatial] [--seeds 0-1]
        [--steps 50] [--methods ...] [--no-adjusted] [--limit N] [--device cpu]

It runs `attncontrol batch --model shapes` and `attncontrol eval` (the same commands a user runs), into
``OUT/defaults`` (every method at its published defaults) and ``OUT/maps16`` (the methods that read attention maps,
at 16x16 maps instead of their default level: see below), and prints the table as Markdown. Reruns resume
(batch folders are resumable); ``--limit N`` takes the first N prompts of each set.

Why an adjusted row: the methods' default map level is "4x below the latents" (16x16 maps from SD's 64x64
latents). The shapes model's latents are 16x16 and its UNet has cross-attention at 16x16 and 8x8 only, so the
default is the nearest level, 8x8: each map cell covers 8x8 pixels of a 64x64 image, where SD's cell covers
32x32 of 512x512 (1/16 of the side in both). The 16x16 level gives the 1/16-of-the-side cells of SD instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

METHODS = [
    "none",
    "attend-excite",
    "astar",
    "refocus",
    "regulate",
    "divide-bind",
    "conform",
    "syngen",
    "boxdiff",
    "initno",
    "attend-excite+syngen",
]
MAP_METHODS = [m for m in METHODS if m not in ("none", "regulate")]  # Regulate edits attention at every level
METRICS = [
    ("shapes_present", "present"),
    ("shapes_bound", "bound"),
    ("shapes_spatial", "spatial"),
    ("shapes_box_iou", "box IoU"),
]


def _run(argv: list[str]) -> None:
    from attncontrol.cli import main

    code = main(argv)
    if code != 0:
        sys.exit(f"`attncontrol {' '.join(argv)}` failed with exit status {code}")


def _batch(folder: Path, sets: list[str], limit: int | None, methods: list[str], args, extra: list[str]) -> None:
    for name in sets:
        argv = [
            "batch",
            "--prompt-set",
            name,
            "--model",
            "shapes",
            "--out",
            str(folder),
            "--seeds",
            args.seeds,
            "--steps",
            str(args.steps),
            "--methods",
            ",".join(methods),
            *extra,
        ]
        if args.device:
            argv += ["--device", args.device]
        if limit:
            argv += ["--limit", str(limit)]
        _run(argv)
    _run(["eval", str(folder), "--compare", "none", "--bootstrap", str(args.bootstrap)])


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _seconds(folder: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        out.setdefault(rec["method"], []).append(float(rec["seconds"]))
    return out


def _cell(row: dict, metric: str) -> str:
    if not row.get(metric):
        return "-"
    return f"{float(row[metric]):.3f} [{float(row[metric + '_ci_low']):.2f}, {float(row[metric + '_ci_high']):.2f}]"


def _delta(comp: dict, method: str, metric: str) -> str:
    c = comp.get((method, metric))
    if not c or c["delta"] in ("", None):
        return "-"
    return f"{float(c['delta']):+.3f} (p={float(c['p']):.3f})"


def table(folders: list[tuple[str, Path]]) -> str:
    import numpy as np

    from attncontrol.scores.stats import bootstrap_ci

    head = ["method", "images", *(label for _, label in METRICS), "s / image", "present vs plain", "bound vs plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for suffix, folder in folders:
        summary = {r["method"]: r for r in _read(folder / "eval" / "summary.csv")}
        comp = {(r["method"], r["metric"]): r for r in _read(folder / "eval" / "compare.csv")}
        seconds = _seconds(folder)
        for method, row in summary.items():
            if suffix and method == "none":
                continue  # the adjusted folder's plain rows are the same images as the defaults' plain rows
            secs = np.array(seconds.get(method, [np.nan]))
            lo, hi = bootstrap_ci(secs, reps=2000) if len(secs) > 1 else (float("nan"), float("nan"))
            cells = [
                method + suffix,
                row["images"],
                *(_cell(row, m) for m, _ in METRICS),
                f"{secs.mean():.2f} [{lo:.2f}, {hi:.2f}]",
                _delta(comp, method, "shapes_present"),
                _delta(comp, method, "shapes_bound"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for the batch runs and their eval tables")
    parser.add_argument("--sets", default="shapes-two,shapes-spatial", help="built-in shapes sets, comma-separated")
    parser.add_argument("--seeds", default="0-1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS), help="batch runs (`none` is the baseline)")
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts of each set")
    parser.add_argument("--no-adjusted", action="store_true", help="skip the 16x16-maps runs")
    parser.add_argument(
        "--adjusted-methods",
        default=None,
        help="the 16x16-maps runs (default: every method that reads maps; `none` is added)",
    )
    parser.add_argument(
        "--part",
        choices=["all", "defaults", "maps16", "table"],
        default="all",
        help="run one folder only (two processes can run the two parts side by side), or only "
        "print the table of what is there",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()

    out = Path(args.out)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods:
        methods = ["none", *methods]
    if args.part in ("all", "defaults"):
        _batch(out / "defaults", sets, args.limit, methods, args, [])
    chosen = args.adjusted_methods.split(",") if args.adjusted_methods else methods
    adjusted = ["none"] + [m.strip() for m in chosen if m.strip() in MAP_METHODS]
    if args.part in ("all", "maps16") and not args.no_adjusted and len(adjusted) > 1:
        _batch(out / "maps16", sets, args.limit, adjusted, args, ["--attn-res", "16"])
    folders = [
        (suffix, out / name)
        for suffix, name in (("", "defaults"), (" (16x16 maps)", "maps16"))
        if (out / name / "eval" / "summary.csv").is_file()
    ]
    print(
        f"\nShapes model, sets {', '.join(sets)}, seeds {args.seeds}, {args.steps} steps; 95% bootstrap intervals; "
        "paired differences from plain with sign-flip p-values\n"
    )
    print(table(folders))


if __name__ == "__main__":
    main()
