"""Trial: torch.compile (inductor) of the UNet's transformer blocks that a guidance pass runs without capturing
(their attention stays SDPA), under gradients w.r.t. the latents. Full-size SD 1.5 UNet architecture (random
weights), batch 1; one process: eager passes, then the compiled ones (first = compile), then a pass at a new
timestep and one with batch 2 to count recompiles. Not used by the library (see docs/benchmarks.md).

    python benchmarks/compile_trial.py [--size 512] [--repeats 3] [--mode default]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, full_size_unet, machine  # noqa: E402
from guidance_pass import ours_engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    args = parser.parse_args()

    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.utils import counters

    unet = full_size_unet()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    engine, _, stack = ours_engine(unet, latents, cond, 500)
    captured = {la.module_name.rsplit(".", 1)[0] for la in engine.store.layers}  # the blocks holding them
    blocks = [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    compiled = [name for name, m in blocks if name not in captured]

    engine.timesteps = torch.tensor([500.0, 250.0])  # step 1: another timestep

    def pass_(z, i=0, images=(0,)):
        p = engine.evaluate(z, i, list(images))
        leaf, objective = p.leaf, p.objective
        (grad,) = torch.autograd.grad(objective.sum(), [leaf])
        return grad

    with stack:
        eager = []
        for _ in range(args.repeats + 1):
            with Timer() as timer:
                ref = pass_(latents)
            eager.append(timer.seconds)
        for name, module in blocks:
            if name in compiled:
                module.compile(mode=args.mode)
        counters.clear()
        with Timer() as first:
            out = pass_(latents)
        frames = dict(counters["stats"])
        times = []
        for _ in range(args.repeats):
            with Timer() as timer:
                out = pass_(latents)
            times.append(timer.seconds)
        before = dict(counters["stats"])
        with Timer() as new_t:
            pass_(latents, i=1)
        after_t = dict(counters["stats"])
        with Timer() as batch2:
            pass_(latents, images=(0, 0))  # the same image twice: batch 2
        after_b = dict(counters["stats"])
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"torch.compile trial ({args.mode}), full-size SD 1.5 UNet, {args.size} px, fp32, cpu ({machine()})")
    print(f"compiled: {len(compiled)} of {len(blocks)} transformer blocks ({', '.join(compiled)})")
    print("| run | s/pass |\n|---|---|")
    print(f"| eager (median of {args.repeats}) | {statistics.median(eager[1:]):.2f} |")
    print(f"| compiled, first pass (compiles) | {first.seconds:.1f} |")
    print(f"| compiled (median of {args.repeats}) | {statistics.median(times):.2f} |")
    print(f"| compiled, new timestep | {new_t.seconds:.2f} |")
    print(f"| compiled, batch 2 (eager batch 2 not timed) | {batch2.seconds:.2f} |")
    print(
        f"speed-up {statistics.median(eager[1:]) / statistics.median(times):.2f}x; gradient max relative difference "
        f"to eager {rel:.1e}"
    )
    print(
        f"dynamo frame counters: after the first pass {frames}; before a new timestep {before}; after it {after_t}; "
        f"after batch 2 {after_b}"
    )


if __name__ == "__main__":
    main()
