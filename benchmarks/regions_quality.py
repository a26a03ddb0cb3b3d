"""Regional prompting (#27) on the shipped shapes model, against plain sampling and the box-guidance methods: one
table, per method, of both subjects' shapes present, both colours bound, the relation right (spatial prompts) and
the IoU of each subject with its layout box, scored by the shapes world's detector (no weights), each with its 95%
bootstrap interval, and the paired differences (same prompts, same seeds, sign-flip p-values) from plain sampling,
from Refocus and from BoxDiff.

    python benchmarks/regions_quality.py --out regions-bench [--sets shapes-two,shapes-spatial]
        [--sample 10 | --limit N] [--seeds 0-1] [--steps 50] [--methods ...] [--device cpu] [--bootstrap 2000]
        [--table-only]

Every prompt of the shapes sets carries a layout (one box per subject, the boxes ``attncontrol batch`` gives
Refocus and BoxDiff); the regions are each subject's phrase ("a red circle") in its layout box. The methods
(:data:`METHODS`): plain, Regions at its defaults (base_prompt_weight 0.3, masks for the first 10/24 of the steps),
Regions with the masks for every step (stop=1.0), Regions whose pixels outside the boxes read the empty prompt
(background=""), Refocus and BoxDiff at their published defaults (built by the
batch's own request builder, as ``attncontrol batch --methods refocus`` builds them), and Regions + Refocus.

The batch CLI does not take regions, so the images are made here through ``attncontrol.generate`` into a folder
in the batch layout (one PNG per image, ``manifest.jsonl`` with each record's prompt-set entry), scored by
``attncontrol eval --compare none`` (the same scores and statistics as ``benchmarks/shapes_quality.py``); the
comparisons with Refocus and BoxDiff are :func:`attncontrol.eval.compare` on eval's per-image table. Reruns
resume: an image whose record and PNG are in place is not made again (the key covers prompt, method, seed, steps
and guidance scale). ``--limit N`` takes the first N prompts of each set, ``--sample N`` the first N of a
random permutation of each (numpy seed 0): a set's first prompts share their first object and the spatial set's
relations cycle, so a sample covers more pairs and all four layouts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_quality import METRICS, _cell, _delta, _read, _run, _seconds  # noqa: E402

METHODS = ("none", "regions", "regions stop=1", "regions background", "refocus", "boxdiff", "regions+refocus")
BASELINES = (("none", "plain"), ("refocus", "Refocus"), ("boxdiff", "BoxDiff"))
COMPARED = (("shapes_bound", "bound"), ("shapes_box_iou", "box IoU"))  # the deltas the table shows per baseline


def regions_of(entry) -> list[tuple[str, tuple[float, ...]]]:
    """Each subject's phrase ("a red circle") in its layout box, from a shapes prompt-set entry's metadata."""
    meta = entry.metadata
    return [(f"a {o['colour']} {o['shape']}", tuple(box)) for o, box in zip(meta["objects"], meta["boxes"])]


def controls(method: str, entry) -> list:
    """The controls of one method for one entry; the box methods through the batch's own request builder (their
    published defaults, the entry's layout boxes)."""
    from attncontrol.batch.items import checked_controls
    from attncontrol.controls.regions import Regions

    out = []
    for name in [] if method == "none" else method.split("+"):
        if name == "regions":
            out.append(Regions(regions=regions_of(entry)))
        elif name == "regions stop=1":
            out.append(Regions(regions=regions_of(entry), stop=1.0))
        elif name == "regions background":  # the pixels outside the boxes read the empty prompt, not the base
            out.append(Regions(regions=regions_of(entry), background=""))
        else:
            out += checked_controls([name], entry.subjects, entry.boxes, {}, entry.source)
    return out


def item_key(entry, method: str, seed: int, steps: int, guidance: float) -> str:
    payload = [entry.prompt, method, seed, steps, guidance, regions_of(entry)]
    return hashlib.sha1(json.dumps(payload).encode()).hexdigest()[:16]


def entries(sets: list[str], limit: int | None, sample: int | None = None) -> list:
    """The prompts of each built-in shapes set: the first ``limit``, or the first ``sample`` of a random
    permutation (numpy seed 0), or all; the sets interleaved (one of each in turn). A run stopped after k rounds
    has made exactly ``--sample k``, so a smaller sample reuses a larger one's images. Every one has a layout."""
    import numpy as np

    from attncontrol.batch import prompt_set

    chosen = []
    for name in sets:
        items = prompt_set(name)
        if sample:
            items = [items[i] for i in np.random.default_rng(0).permutation(len(items))[:sample]]
        elif limit:
            items = items[:limit]
        for e in items:
            if getattr(e, "benchmark", None) != "shapes" or not e.metadata.get("boxes"):
                sys.exit(f"{e.source}: regions need a shapes prompt with one layout box per subject")
        chosen.append(items)
    rounds = max(map(len, chosen), default=0)
    return [items[k] for k in range(rounds) for items in chosen if k < len(items)]


def generate(out: Path, todo: list, seeds: list[int], methods: list[str], steps: int, device: str | None) -> int:
    """Make every (entry, seed, method) image not yet in ``out``; returns how many failed (listed in
    ``out/failures.jsonl``). Ordered prompt, seed, then method, so a stopped run leaves whole comparisons."""
    import torch

    import attncontrol
    from attncontrol.batch import finished_records
    from attncontrol.io import append_json_line, atomic_save_png
    from attncontrol.loading import load_pipeline
    from attncontrol.models import get_adapter

    out.mkdir(parents=True, exist_ok=True)
    done = set(finished_records(out))
    pipe = load_pipeline("shapes", device=device or "cpu")
    pipe.set_progress_bar_config(disable=True)
    guidance = float(get_adapter(pipe).default_guidance_scale())
    jobs = [(e, s, m) for e in todo for s in seeds for m in methods]
    pending = [j for j in jobs if item_key(j[0], j[2], j[1], steps, guidance) not in done]
    print(f"{len(jobs) - len(pending)} of {len(jobs)} images already made; making {len(pending)}", file=sys.stderr)
    failed, start = 0, time.perf_counter()
    for n, (entry, seed, method) in enumerate(pending, 1):
        key = item_key(entry, method, seed, steps, guidance)
        slug = re.sub(r"[^a-z0-9]+", "-", f"{entry.prompt}__{method}".lower()).strip("-")[:64]
        name = f"{slug}__s{seed}__{key[:8]}.png"
        record = {
            "key": key,
            "file": name,
            "prompt": entry.prompt,
            "method": method,
            "seed": seed,
            "source": entry.source,
            "subjects": list(entry.subjects or []),
            "boxes": {s: [list(b) for b in bs] for s, bs in (entry.boxes or {}).items()},
            "regions": [[text, list(box)] for text, box in regions_of(entry)] if "regions" in method else None,
            "settings": {"model": "shapes", "steps": steps, "guidance_scale": guidance},
            "benchmark": entry.benchmark_record(),
        }
        t0 = time.perf_counter()
        try:
            result = attncontrol.generate(
                pipe,
                entry.prompt,
                controls(method, entry),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
            )
        except Exception as err:  # one failing method must not lose the rest of the table
            failed += 1
            append_json_line(out / "failures.jsonl", {**record, "error": f"{type(err).__name__}: {err}"})
            print(f"FAILED {method} s{seed} {entry.prompt!r}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        record["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_save_png(result.images[0], out / name, {"parameters": json.dumps(record)})
        append_json_line(out / "manifest.jsonl", record)  # only once the image is in place
        if n % 10 == 0 or n == len(pending):
            spent = time.perf_counter() - start
            print(f"{n}/{len(pending)} images, {spent:.0f} s, ~{spent / n * (len(pending) - n):.0f} s left",
                  file=sys.stderr)  # fmt: skip
    return failed


def _per_image(folder: Path) -> list[dict]:
    """eval's per-image rows, metric cells as floats (empty cells left out)."""
    from attncontrol.eval import METRICS as ALL

    rows = []
    for row in _read(folder / "eval" / "per_image.csv"):
        rows.append(
            {
                "prompt": row["prompt"],
                "seed": int(row["seed"]),
                "method": row["method"],
                **{m: float(row[m]) for m in ALL if row.get(m) not in (None, "")},
            }
        )
    return rows


def table(folder: Path, reps: int = 2000) -> str:
    """The Markdown table of a scored folder (``attncontrol eval --compare none`` has run on it)."""
    import numpy as np

    from attncontrol.eval import compare
    from attncontrol.scores.stats import bootstrap_ci

    summary = {r["method"]: r for r in _read(folder / "eval" / "summary.csv")}
    rows = _per_image(folder)
    present = {r["method"] for r in rows}
    comps = {"none": {(r["method"], r["metric"]): r for r in _read(folder / "eval" / "compare.csv")}}
    for base, _ in BASELINES[1:]:
        if base in present:
            comps[base] = {(c["method"], c["metric"]): c for c in compare(rows, base, reps)}
    seconds = _seconds(folder)
    head = ["method", "images", *(label for _, label in METRICS), "s / image", "present vs plain"]
    head += [f"{label} vs {who}" for base, who in BASELINES if base in comps for _, label in COMPARED]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in [m for m in METHODS if m in summary] + [m for m in summary if m not in METHODS]:
        row = summary[method]
        secs = np.array(seconds.get(method, [math.nan]))
        lo, hi = bootstrap_ci(secs, reps=reps) if len(secs) > 1 else (math.nan, math.nan)
        cells = [
            method,
            row["images"],
            *(_cell(row, m) for m, _ in METRICS),
            f"{secs.mean():.2f} [{lo:.2f}, {hi:.2f}]",
            _delta(comps["none"], method, "shapes_present"),
        ]
        cells += [_delta(comps[base], method, m) for base, _ in BASELINES if base in comps for m, _ in COMPARED]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for the images, their manifest and eval tables")
    parser.add_argument("--sets", default="shapes-two,shapes-spatial", help="built-in shapes sets, comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts of each set")
    parser.add_argument("--sample", type=int, default=None, help="N prompts of each set at random (seed 0)")
    parser.add_argument("--seeds", default="0-1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS), help="of: " + ", ".join(METHODS))
    parser.add_argument("--device", default=None)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--table-only", action="store_true", help="score and print what is there, make nothing")
    args = parser.parse_args(argv)

    from attncontrol.batch import parse_seeds

    out = Path(args.out)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "none" not in methods:
        methods = ["none", *methods]
    t0 = time.perf_counter()
    if not args.table_only:
        todo = entries(sets, args.limit, args.sample)
        failed = generate(out, todo, parse_seeds(args.seeds), methods, args.steps, args.device)
        if failed:
            print(f"{failed} images failed: see {out / 'failures.jsonl'}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # eval's own tables; stdout is this script's table
        _run(["eval", str(out), "--compare", "none", "--bootstrap", str(args.bootstrap)])
    print(
        f"\nShapes model, sets {', '.join(sets)}"
        + (f" ({args.sample} prompts of each at random, seed 0)" if args.sample else "")
        + (f" (first {args.limit} prompts of each)" if args.limit and not args.sample else "")
        + f", seeds {args.seeds}, {args.steps} steps; 95% bootstrap intervals; paired differences (same prompts and "
        f"seeds) with sign-flip p-values; {time.perf_counter() - t0:.0f} s\n"
    )
    print(table(out, args.bootstrap))


if __name__ == "__main__":
    main()
