"""Cost of each control per image, and of all of them combined, relative to plain SD and to A&E, on the
full-size SD 1.5 UNet architecture (random weights), every method at its default schedule, one process.

    python benchmarks/methods.py [--size 256] [--steps 50] [--device cpu] [--dtype fp32] [--only "SynGen,InitNO"]

Guidance passes are counted (UNet forwards with gradients): combined controls share one pass per step (and
per refinement iteration) instead of one per control. With random weights no subject ever reaches a
threshold, so refinement (A&E's, D&B's, BoxDiff's and InitNO's thresholds, Refocus's iterations) runs to its caps,
and InitNO's noise search runs all its rounds and its 50-step fallback: a worst case. InitNO's search passes
count as guidance passes (forward and backward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, machine  # noqa: E402
from whole_image import DTYPES, build_pipeline  # noqa: E402

BOXES = {"cat": (0.05, 0.2, 0.5, 0.9), "dog": (0.55, 0.2, 0.95, 0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--only", default="", help="comma-separated run names to keep (plain SD and A&E always run)")
    args = parser.parse_args()

    import attncontrol

    pipe = build_pipeline(args.device, DTYPES[args.dtype])
    subjects = ["cat", "dog"]
    runs = {
        "plain SD": [],
        "Attend-and-Excite": [attncontrol.AttendExcite(subjects=subjects)],
        "A-STAR": [attncontrol.AStar(subjects=subjects)],
        "Refocus": [attncontrol.Refocus(boxes=BOXES)],
        "Regulate": [attncontrol.Regulate(subjects=subjects)],
        "Divide & Bind": [attncontrol.DivideBind(subjects=subjects)],
        "CONFORM": [attncontrol.Conform(subjects=subjects)],
        "SynGen": [attncontrol.SynGen(subjects=["black cat", "white dog"])],
        "BoxDiff": [attncontrol.BoxDiff(boxes=BOXES)],
        "InitNO": [attncontrol.InitNO(subjects=subjects)],
        "A&E + A-STAR + Refocus + Regulate": [
            attncontrol.AttendExcite(subjects=subjects),
            attncontrol.AStar(subjects=subjects),
            attncontrol.Refocus(boxes=BOXES),
            attncontrol.Regulate(subjects=subjects),
        ],
    }
    if args.only:
        keep = {"plain SD", "Attend-and-Excite", *(n.strip() for n in args.only.split(","))}
        runs = {name: controls for name, controls in runs.items() if name in keep}
    prompts = {"SynGen": "a black cat and a white dog"}
    passes: list[bool] = []
    pipe.unet.conv_in.register_forward_hook(lambda m, i, o: passes.append(torch.is_grad_enabled()))
    gen_dev = args.device if args.device.startswith("cuda") else "cpu"
    common = dict(num_inference_steps=args.steps, output_type="latent", height=args.size, width=args.size)
    attncontrol.generate(pipe, "a cat and a dog", [], **{**common, "num_inference_steps": 2})  # warm-up
    rows = {}
    for name, controls in runs.items():
        passes.clear()
        with Timer() as t:
            attncontrol.generate(
                pipe,
                prompts.get(name, "a cat and a dog"),
                controls,
                generator=torch.Generator(gen_dev).manual_seed(0),
                **common,
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        rows[name] = (t.seconds, passes.count(True))
        print(f"  {name}: {t.seconds:.1f} s, {passes.count(True)} guidance passes", file=sys.stderr, flush=True)
    plain, ae = rows["plain SD"][0], rows["Attend-and-Excite"][0]
    print(
        f"Cost per image, full-size SD 1.5 UNet, {args.size} px, {args.steps} steps, defaults, {args.dtype}, "
        f"{args.device} ({machine()})"
    )
    print("| run | seconds | guidance passes | x plain | x A&E |")
    print("|---|---|---|---|---|")
    for name, (seconds, n) in rows.items():
        print(f"| {name} | {seconds:.1f} | {n} | {seconds / plain:.2f} | {seconds / ae:.2f} |")
    combined = "A&E + A-STAR + Refocus + Regulate"
    if combined in rows:
        single = sum(rows[k][1] for k in ("Attend-and-Excite", "A-STAR", "Refocus"))
        print(
            f"combined run: {rows[combined][1]} guidance passes, against {single} for the latent-guidance methods "
            "run one by one"
        )


if __name__ == "__main__":
    main()
