"""One Attend-and-Excite guidance pass (forward + backward to the latents) on a full-size UNet architecture
(random weights, built from its config), batch 1: ours vs diffusers' approach.

    python benchmarks/guidance_pass.py [--arch sd15|sdxl] [--size PX] [--repeats 3] [--device cpu] [--dtype fp32]

sd15 defaults to 512 px (16x16 maps, 5 layers captured); sdxl to 768 px, the largest size at which the
diffusers-style all-layers capture fits in 24 GiB here (24x24 maps: SDXL's level 4x below the latents).

diffusers' approach = its StableDiffusionAttendAndExcitePipeline's: explicit-attention processors in all
attention layers, a full forward, UNet parameters left requiring grad. Ours = capture processors on the
cross-attention layers at the map resolution only (SDPA elsewhere), early exit after the last of them,
parameters frozen. A third row runs ours with gradient checkpointing (``checkpointing=True``: the layers of the blocks
before the one holding the last captured layer are recomputed in the backward instead of keeping their
activations).
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


def _unet_kwargs(cond):
    from attncontrol.models import SDAdapter, SDXLAdapter

    return (SDXLAdapter if "text_embeds" in cond else SDAdapter).unet_inputs(cond)


def run_diffusers(unet, latents, cond, t, repeats, device):
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
        AttendExciteAttnProcessor,
        AttentionStore,
        StableDiffusionAttendAndExcitePipeline,
    )

    store = AttentionStore(tuple(d // 4 for d in latents.shape[-2:]))
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
            unet(z, t, **_unet_kwargs(cond))
            maps = store.aggregate_attention(from_where=("up", "down", "mid"))
            peaks = StableDiffusionAttendAndExcitePipeline._compute_max_attention_per_index(maps, [2, 5])
            loss = max(max(0, 1.0 - p) for p in peaks)
            (grad,) = torch.autograd.grad(loss, [z])
            _sync(device)
        times.append(timer.seconds)
    return times[1:], float(grad.abs().sum())


def ours_engine(unet, latents, cond, t, checkpointing=False):
    """(engine, control, context to enter) for our A&E guidance pass on a bare UNet (no pipeline around it): the
    family adapter over a stand-in pipeline that holds just the UNet, the tokenizer and a DDIM scheduler."""
    from types import SimpleNamespace

    from attncontrol.controls import AttendExcite
    from attncontrol.controls.base import ControlContext
    from attncontrol.guidance import GuidanceEngine
    from attncontrol.models import SDAdapter, SDXLAdapter
    from attncontrol.processors import capture_layers
    from attncontrol.run import frozen
    from attncontrol.store import AttentionStore
    from attncontrol.testing import make_clip_tokenizer, make_scheduler

    tok = make_clip_tokenizer()
    stand_in = SimpleNamespace(unet=unet, tokenizer=tok, scheduler=make_scheduler("ddim"), vae_scale_factor=8)
    adapter = (SDXLAdapter if "text_embeds" in cond else SDAdapter)(stand_in)
    hw = tuple(latents.shape[-2:])
    res = (hw[0] // 4, hw[1] // 4)
    layers = [la for la in adapter.layers if la.kind == "cross" and adapter.grid(la, hw) == res]
    store = AttentionStore(layers, {la.name: res for la in layers})
    prompt = "a cat and a dog"
    ctx = ControlContext.simple(tok, [prompt], hw, res, device=latents.device)
    ctx.grids = adapter.layers_by_grid(hw)
    control = AttendExcite(subjects=["cat", "dog"]).prepare(ctx)
    engine = GuidanceEngine(adapter, store, [control], cond, torch.full((50,), float(t)), checkpointing=checkpointing)
    stack = contextlib.ExitStack()
    stack.enter_context(capture_layers(unet, adapter.layers, store))
    stack.enter_context(frozen(unet))
    stack.enter_context(torch.enable_grad())
    return engine, control, stack


def guidance_pass(engine, control, latents):
    """One pass: forward to the last captured layer, loss, gradient w.r.t. the latents."""
    p = engine.evaluate(latents, 0, [0])
    leaf, objective = p.leaf, p.objective
    (grad,) = torch.autograd.grad(objective.sum() / control.plan(0).step_size, [leaf])
    return grad


def run_ours(unet, latents, cond, t, repeats, device, checkpointing=False):
    engine, control, stack = ours_engine(unet, latents, cond, t, checkpointing)
    times = []
    with stack:
        for _ in range(repeats + 1):
            with Timer() as timer:
                grad = guidance_pass(engine, control, latents)
                _sync(device)
            times.append(timer.seconds)
    return times[1:], float(grad.abs().sum())


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child(args) -> None:
    from attncontrol.models.unet import unet_layers
    from attncontrol.store import grid_after

    dtype = DTYPES[args.dtype]
    unet = full_size_unet(dtype, args.arch).to(args.device)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(args.device, dtype)
    width = unet.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.randn(1, 77, width, generator=g).to(args.device, dtype)}
    if args.arch == "sdxl":  # pooled text embedding and (original size, crop, target size)
        cond["text_embeds"] = torch.randn(1, 1280, generator=g).to(args.device, dtype)
        cond["time_ids"] = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]]).to(args.device, dtype)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mem(args.device)
    if args.variant == "diffusers":
        times, gsum = run_diffusers(unet, latents, cond, 500, args.repeats, args.device)
    else:
        times, gsum = run_ours(unet, latents, cond, 500, args.repeats, args.device, args.variant == "ours-ckpt")
    print(
        json.dumps(
            {
                "variant": args.variant,
                "median_s": statistics.median(times),
                "times": times,
                "peak_gb": _peak_mem(args.device),
                "after_load_gb": base,
                "grad_abs_sum": gsum,
                "layers": len(unet.attn_processors),
                "captured": sum(
                    la.kind == "cross" and grid_after(latents.shape[-2:], la.level) == (args.size // 32,) * 2
                    for la in unet_layers(unet)
                ),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, default=None, help="pixels; default 512 (sd15) or 768 (sdxl)")
    parser.add_argument("--variant", choices=["ours", "ours-ckpt", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (768 if args.arch == "sdxl" else 512)
    if args.size % 32:
        parser.error(f"--size must be a multiple of 32, got {args.size}")
    if args.variant:
        return child(args)
    rows = {}
    for variant in ("diffusers", "ours", "ours-ckpt"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--arch",
            args.arch,
            "--repeats",
            str(args.repeats),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--size",
            str(args.size),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == -9:  # killed by the kernel: out of memory
            rows[variant] = None
            continue
        if proc.returncode:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, o, c = rows["diffusers"], rows["ours"], rows["ours-ckpt"]
    if None in (d, o, c):
        for name, r in rows.items():
            status = "killed: out of memory" if r is None else f"{r['median_s']:.2f} s/pass, peak {r['peak_gb']:.2f} GB"
            print(f"{args.arch} {args.size} px, {name}: {status}")
        return
    mem = "peak GPU memory (GB)" if args.device.startswith("cuda") else "peak RSS (GB)"
    res = args.size // 32
    arch = {"sd15": "SD 1.5", "sdxl": "SDXL base"}[args.arch]
    print(
        f"A&E guidance pass, full-size {arch} UNet, {args.size} px ({res}x{res} maps), batch 1, {args.dtype}, "
        f"{args.device} ({machine()})"
    )
    print(f"| approach | median s/pass | {mem} | over post-load |")
    print("|---|---|---|---|")
    names = (
        f"diffusers (all {d['layers']} layers explicit, full forward)",
        f"attncontrol ({o['captured']} layers, early exit)",
        "attncontrol + gradient checkpointing (layers before the last captured block)",
    )
    for name, r in zip(names, (d, o, c)):
        print(f"| {name} | {r['median_s']:.2f} | {r['peak_gb']:.2f} | {r['peak_gb'] - r['after_load_gb']:.2f} |")

    def over(r):
        return r["peak_gb"] - r["after_load_gb"]

    for label, r in (("attncontrol", o), ("with checkpointing", c)):
        print(
            f"{label}: speed-up {d['median_s'] / r['median_s']:.2f}x, peak memory ratio "
            f"{r['peak_gb'] / d['peak_gb']:.2f}x (over post-load: {over(r) / over(d):.2f}x)"
        )
    print(
        f"checkpointing vs without: time {c['median_s'] / o['median_s']:.2f}x, memory over post-load "
        f"{over(c) / over(o):.2f}x; gradient {'identical' if c['grad_abs_sum'] == o['grad_abs_sum'] else 'DIFFERENT'}"
    )
    rel = abs(d["grad_abs_sum"] - o["grad_abs_sum"]) / d["grad_abs_sum"]
    print(f"same gradient as diffusers: |sum|grad|| relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
