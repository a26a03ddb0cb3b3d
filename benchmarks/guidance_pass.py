"""One Attend-and-Excite guidance pass (forward + backward to the latents) on the full-size SD 1.5 UNet
architecture (random weights, built from its config) at 512 px, batch 1: ours vs diffusers' approach.

    python benchmarks/guidance_pass.py [--repeats 3] [--device cpu] [--dtype fp32]

diffusers' approach = its StableDiffusionAttendAndExcitePipeline's: explicit-attention processors in all
32 layers, a full forward, UNet parameters left requiring grad. Ours = capture processors on the five
16x16 cross-attention layers only (SDPA elsewhere), early exit after the last of them, parameters frozen.
Each variant runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from _common import Timer, full_size_unet, machine, peak_rss_gb  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _peak_mem(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1024**3
    return peak_rss_gb()


def run_diffusers(unet, latents, cond, t, repeats, device):
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
        AttendExciteAttnProcessor,
        AttentionStore,
        StableDiffusionAttendAndExcitePipeline,
    )

    store = AttentionStore((16, 16))
    procs = {}
    for name in unet.attn_processors:
        place = "mid" if name.startswith("mid_block") else "up" if name.startswith("up_blocks") else "down"
        procs[name] = AttendExciteAttnProcessor(attnstore=store, place_in_unet=place)
    store.num_att_layers = len(procs)
    unet.set_attn_processor(dict(procs))  # set_attn_processor empties the dict it is given
    times = []
    for _ in range(repeats + 1):
        with Timer() as timer:
            z = latents.clone().requires_grad_(True)
            unet(z, t, encoder_hidden_states=cond)
            maps = store.aggregate_attention(from_where=("up", "down", "mid"))
            peaks = StableDiffusionAttendAndExcitePipeline._compute_max_attention_per_index(maps, [2, 5])
            loss = max(max(0, 1.0 - p) for p in peaks)
            (grad,) = torch.autograd.grad(loss, [z])
            _sync(device)
        times.append(timer.seconds)
    return times[1:], float(grad.abs().sum())


def run_ours(unet, latents, cond, t, repeats, device):
    from attncontrol.controls import AttendExcite
    from attncontrol.controls.base import ControlContext
    from attncontrol.guidance import GuidanceEngine
    from attncontrol.pipeline import _frozen
    from attncontrol.processors.capture import capture_layers, find_attention_layers, layer_resolution
    from attncontrol.store import AttentionStore
    from attncontrol.testing import make_clip_tokenizer

    class Adapter:  # the SD adapter's guidance forward, without a pipeline around the bare UNet
        def guidance_forward(self, x, t, c, kw=None):
            from attncontrol.store import EarlyExit

            with contextlib.suppress(EarlyExit):
                unet(x, t, **c)

    hw = tuple(latents.shape[-2:])
    layers = [
        la for la in find_attention_layers(unet) if la.kind == "cross" and layer_resolution(hw, la.level) == (16, 16)
    ]
    store = AttentionStore(layers, {la.name: layer_resolution(hw, la.level) for la in layers})
    tok = make_clip_tokenizer()
    prompt = "a cat and a dog"
    ctx = ControlContext(tok, [prompt], [prompt], 1, hw, 50, [(16, 16)], (16, 16), False, device=latents.device)
    control = AttendExcite(subjects=["cat", "dog"]).prepare(ctx)
    engine = GuidanceEngine(Adapter(), store, [control], {"encoder_hidden_states": cond}, torch.full((50,), float(t)))
    times = []
    with capture_layers(unet, store), _frozen(unet), torch.enable_grad():
        for _ in range(repeats + 1):
            with Timer() as timer:
                leaf, objective, _ = engine._evaluate(latents, [0], 0)
                (grad,) = torch.autograd.grad(objective.sum() / control.step_size(0), [leaf])
                _sync(device)
            times.append(timer.seconds)
    return times[1:], float(grad.abs().sum())


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args) -> None:
    dtype = DTYPES[args.dtype]
    unet = full_size_unet(dtype).to(args.device)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(args.device, dtype)
    cond = torch.randn(1, 77, 768, generator=g).to(args.device, dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mem(args.device)
    fn = run_ours if args.variant == "ours" else run_diffusers
    times, gsum = fn(unet, latents, cond, 500, args.repeats, args.device)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "median_s": statistics.median(times),
                "times": times,
                "peak_gb": _peak_mem(args.device),
                "after_load_gb": base,
                "grad_abs_sum": gsum,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--variant", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    rows = {}
    for variant in ("diffusers", "ours"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--repeats",
            str(args.repeats),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--size",
            str(args.size),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[variant] = json.loads(out)
    d, o = rows["diffusers"], rows["ours"]
    mem = "peak GPU memory (GB)" if args.device.startswith("cuda") else "peak RSS (GB)"
    print(
        f"A&E guidance pass, full-size SD 1.5 UNet, {args.size} px, batch 1, {args.dtype}, {args.device} ({machine()})"
    )
    print(f"| approach | median s/pass | {mem} | over post-load |")
    print("|---|---|---|---|")
    for name, r in (("diffusers (all 32 layers explicit, full forward)", d), ("attncontrol (5 layers, early exit)", o)):
        print(f"| {name} | {r['median_s']:.2f} | {r['peak_gb']:.2f} | {r['peak_gb'] - r['after_load_gb']:.2f} |")
    print(
        f"speed-up {d['median_s'] / o['median_s']:.2f}x, peak memory ratio {o['peak_gb'] / d['peak_gb']:.2f}x "
        f"(over post-load: {(o['peak_gb'] - o['after_load_gb']) / (d['peak_gb'] - d['after_load_gb']):.2f}x)"
    )
    rel = abs(d["grad_abs_sum"] - o["grad_abs_sum"]) / d["grad_abs_sum"]
    print(f"same gradient: |sum|grad|| relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
