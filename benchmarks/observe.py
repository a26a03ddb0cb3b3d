"""What recording attention costs: a plain image vs the same image with ``attention=[subjects]`` (the maps the UI
heatmaps, ``--save-attention`` and the batch metrics use), full-size SD 1.5 UNet (random weights), one process.

    python benchmarks/observe.py [--steps 10] [--size 512] [--device cpu] [--dtype fp32]

Alternating runs (plain, observed, plain, observed, ...), median of ``--repeats``; the outputs must be equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, machine  # noqa: E402
from whole_image import DTYPES, build_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()

    import attncontrol

    pipe = build_pipeline(args.device, DTYPES[args.dtype])
    gen_dev = args.device if args.device.startswith("cuda") else "cpu"
    common = dict(num_inference_steps=args.steps, output_type="latent", height=args.size, width=args.size)

    def run(attention):
        with Timer() as t:
            out = attncontrol.generate(
                pipe,
                "a cat and a dog",
                [],
                generator=torch.Generator(gen_dev).manual_seed(0),
                attention=attention,
                **common,
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return out, t.seconds

    attncontrol.generate(pipe, "a cat and a dog", [], **{**common, "num_inference_steps": 2})  # warm-up
    times: dict[str, list[float]] = {"plain": [], "observed": []}
    for _ in range(args.repeats):
        plain, s = run(False)
        times["plain"].append(s)
        seen, s = run(["cat", "dog"])
        times["observed"].append(s)
    same = torch.equal(plain.images, seen.images)
    kept = seen.attention.maps.numel() * 4 + seen.attention.raw.numel() * 4
    p, o = statistics.median(times["plain"]), statistics.median(times["observed"])
    print(
        f"Recording attention, full-size SD 1.5 UNet, {args.size} px, {args.steps} steps, 2 subjects, {args.dtype}, "
        f"{args.device} ({machine()}), median of {args.repeats}"
    )
    print("| run | seconds | x plain |")
    print("|---|---|---|")
    print(f"| plain | {p:.1f} | 1.00 |")
    print(f"| attention=['cat', 'dog'] | {o:.1f} | {o / p:.3f} |")
    print(f"outputs identical: {same}; maps kept: {kept / 1024:.0f} KiB for {args.steps} steps")


if __name__ == "__main__":
    main()
