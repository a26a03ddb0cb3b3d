"""One Attend-and-Excite guidance pass (forward + backward to the latents) on a full-size MMDiT transformer with
random weights (no text encoders: random prompt embeddings of the right shapes), batch 1, capturing the image->text
attention of every joint block: the research code's approach (an explicit (N+M)^2 softmax per head in every joint
block, its output computed from those probabilities) against ours (the layer's own SDPA for the output, image->text
probabilities from a fused log-sum-exp, only the subjects' text columns).

    python benchmarks/mmdit_pass.py [--arch sd35m|flux-width] [--size 512] [--repeats 1] [--blocks N]

sd35m: the SD3.5-medium transformer (24 joint blocks, 24 heads x 64, its published config). flux-width: FLUX.1's
block width (24 heads x 128, RoPE) with 2 double- and 4 single-stream blocks (the full 57 blocks do not fit in
24 GiB with gradients); its image->text maps come from the double-stream blocks (FOCUS's default) in both variants.
Each variant runs in its own process, so peak memory is its own; a variant the kernel kills is reported as such.
The families of issue #26 (Qwen-Image, Z-Image, PixArt-Sigma, FLUX.2, SANA) are in ``family_pass.py``: the same
variants and output, driven through each family's adapter and tiny pipeline (``--all`` runs them at 512 and 1024 px).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, machine, peak_rss_gb  # noqa: E402

PROMPT = "a cat and a dog"


def _random_model(arch: str, blocks: int | None):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from attncontrol.testing import FLUX_WIDTH_CONFIG, SD35_MEDIUM_CONFIG

    torch.manual_seed(0)
    if arch == "sd35m":
        config = dict(SD35_MEDIUM_CONFIG, **({"num_layers": blocks} if blocks else {}))
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < config["num_layers"])
        cls = SD3Transformer2DModel
    else:
        config, cls = dict(FLUX_WIDTH_CONFIG), FluxTransformer2DModel
    with init_empty_weights():
        model = cls(**config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def _stand_in(arch: str, model):
    """The family adapter over a stand-in pipeline that holds the transformer, the tokenizers and a scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from attncontrol.models import FluxAdapter, SD3Adapter
    from attncontrol.testing import make_clip_tokenizer, make_t5_tokenizer

    clip, t5 = make_clip_tokenizer(), make_t5_tokenizer()
    pipe = SimpleNamespace(
        transformer=model,
        tokenizer=clip,
        tokenizer_2=clip if arch == "sd35m" else t5,
        tokenizer_3=t5,
        text_encoder_3=object(),
        tokenizer_max_length=77,
        vae_scale_factor=8,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        default_sample_size=128,
        _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids,
    )
    return (SD3Adapter if arch == "sd35m" else FluxAdapter)(pipe)


def _inputs(arch: str, size: int, text_len: int):
    g = torch.Generator().manual_seed(0)
    h = size // 8
    if arch == "sd35m":
        latents = torch.randn(1, 16, h, h, generator=g)
        cond = {
            "encoder_hidden_states": torch.randn(1, text_len, 4096, generator=g),
            "pooled_projections": torch.randn(1, 2048, generator=g),
        }
    else:
        latents = torch.randn(1, (h // 2) ** 2, 64, generator=g)
        cond = {
            "encoder_hidden_states": torch.randn(1, text_len, 4096, generator=g),
            "pooled_projections": torch.randn(1, 768, generator=g),
        }
    return latents, cond


def run_ours(arch, model, size, repeats, checkpointing=False):
    from attncontrol import AttendExcite
    from attncontrol.controls.base import ControlContext
    from attncontrol.guidance import GuidanceEngine
    from attncontrol.processors import capture_layers
    from attncontrol.run import union_columns
    from attncontrol.store import AttentionStore

    adapter = _stand_in(arch, model)
    latent_hw = (size // 8, size // 8)
    adapter.bind_size(latent_hw)
    adapter.text_ids = torch.zeros(256, 3)
    adapter.guidance_scale = 3.5
    text = adapter.text_layout([PROMPT], {"max_sequence_length": 256})
    ctx = ControlContext(
        text,
        1,
        latent_hw,
        28,
        adapter.layers_by_grid(latent_hw),
        adapter.default_attn_res(latent_hw),
        True,
        cfg_batch=False,
        block_index={la.name: la.block_index for la in adapter.layers},
        default_blocks=adapter.default_blocks(),
    )
    control = AttendExcite(subjects=["cat", "dog"]).prepare(ctx)
    key = control.maps.key
    names = ctx.select(key)
    layers = [la for la in adapter.layers if la.name in names]
    store = AttentionStore(layers, {n: key.grid for n in names}, columns=union_columns([control]), text_len=ctx.seq_len)
    latents, cond = _inputs(arch, size, ctx.seq_len)
    engine = GuidanceEngine(
        adapter, store, [control], cond, torch.full((28,), 500.0), layer_names={key: names}, checkpointing=checkpointing
    )
    times = []
    with capture_layers(model, adapter.layers, store), torch.enable_grad():
        for _ in range(repeats):
            with Timer() as timer:
                p = engine.evaluate(latents, 0)
                (grad,) = torch.autograd.grad(p.objective.sum(), [p.leaf])
            times.append(timer.seconds)
    return times, float(grad.abs().sum()), len(names)


class ExplicitJoint:
    """The research code's capture: the full (N+M)^2 softmax per head, explicitly, its output from it."""

    def __init__(self, ops, maps: list, n_image: int, text_first: bool):
        self.ops, self.maps, self.n_image, self.text_first = ops, maps, n_image, text_first

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs
    ):
        args = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "image_rotary_emb": image_rotary_emb,
        }
        q, k, text_len = self.ops.query_key(attn, args)
        v = self.ops.values(attn, args)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        img, start = self.ops.split(q.shape[2], text_len or q.shape[2] - self.n_image)
        self.maps.append(probs[:, :, img, start : start + (text_len or q.shape[2] - self.n_image)].mean(1))
        out = (probs @ v).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out if self.text_first else attn.to_out[0](out)
        text, image = (
            (out[:, :text_len], out[:, text_len:]) if self.text_first else (out[:, -text_len:], out[:, :-text_len])
        )
        image = attn.to_out[0](image)
        text = attn.to_add_out(text) if not getattr(attn, "context_pre_only", False) else text
        return image, text


def run_explicit(arch, model, size, repeats):
    from attncontrol.losses import attend_excite_loss, subject_maps
    from attncontrol.ops import token_softmax
    from attncontrol.processors.joint import JOINT, ROTARY_JOINT

    adapter = _stand_in(arch, model)
    latent_hw = (size // 8, size // 8)
    adapter.bind_size(latent_hw)
    adapter.text_ids = torch.zeros(256, 3)
    adapter.guidance_scale = 3.5
    text = adapter.text_layout([PROMPT], {"max_sequence_length": 256})
    grid = (size // 16, size // 16)
    blocks = adapter.default_blocks().get("cross")
    procs, maps = dict(model.attn_processors), []
    ops = JOINT if arch == "sd35m" else ROTARY_JOINT
    for name in list(procs):
        block = int(name.split(".")[1]) + (len(model.transformer_blocks) if name.startswith("single") else 0)
        if name.endswith("attn.processor") and (blocks is None or block in blocks):
            procs[name] = ExplicitJoint(ops, maps, grid[0] * grid[1], arch != "sd35m")
    model.set_attn_processor(procs)
    latents, cond = _inputs(arch, size, text.length)
    subjects = text.resolve(0, ["cat", "dog"])
    keep = text.keep(0, True)[None]
    times = []
    for _ in range(repeats):
        maps.clear()
        with Timer() as timer, torch.enable_grad():
            leaf = latents.clone().requires_grad_(True)
            adapter.guidance_forward(leaf, torch.tensor(500.0), cond)
            avg = torch.stack(maps).mean(0).view(1, *grid, -1)
            probs = token_softmax(avg, keep, 100.0)
            loss = attend_excite_loss(subject_maps(probs[0], subjects).flatten(1).amax(1))
            (grad,) = torch.autograd.grad(loss * 20.0, [leaf])
        times.append(timer.seconds)
    return times, float(grad.abs().sum()), len(maps)


def child(args) -> None:
    model = _random_model(args.arch, args.blocks)
    base = peak_rss_gb()
    if args.variant == "explicit":
        times, gsum, layers = run_explicit(args.arch, model, args.size, args.repeats)
    else:
        times, gsum, layers = run_ours(args.arch, model, args.size, args.repeats, args.variant == "ours-ckpt")
    print(
        json.dumps(
            {
                "variant": args.variant,
                "times": times,
                "median_s": sorted(times)[len(times) // 2],
                "peak_gb": peak_rss_gb(),
                "after_load_gb": base,
                "grad_abs_sum": gsum,
                "layers": layers,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd35m", "flux-width"], default="sd35m")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=None, help="sd35m: fewer joint blocks (a quick trial)")
    parser.add_argument("--variant", choices=["ours", "ours-ckpt", "explicit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    if args.variant:
        return child(args)
    rows = {}
    for variant in ("explicit", "ours", "ours-ckpt"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--arch",
            args.arch,
            "--size",
            str(args.size),
            "--repeats",
            str(args.repeats),
        ] + (["--blocks", str(args.blocks)] if args.blocks else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode in (-9, 137):
            rows[variant] = None
            continue
        if proc.returncode:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    name = {"sd35m": "SD3.5-medium transformer", "flux-width": "FLUX-width transformer (2 double + 4 single)"}
    print(
        f"A&E guidance pass, {name[args.arch]}"
        + (f" ({args.blocks} blocks)" if args.blocks else "")
        + f", random weights, {args.size} px, batch 1, fp32, cpu ({machine()})"
    )
    print("| approach | s/pass | peak RSS (GB) | a pass adds (GB) |")
    print("|---|---|---|---|")
    labels = {
        "explicit": "explicit (N+M)^2 softmax in every captured block (research code)",
        "ours": "attncontrol (layer's SDPA + fused log-sum-exp, subject columns)",
        "ours-ckpt": "attncontrol, checkpointing=True (blocks before the last captured one recomputed)",
    }
    for variant, r in rows.items():
        if r is None:
            print(f"| {labels[variant]} | killed: out of memory | | |")
        else:
            print(
                f"| {labels[variant]} ({r['layers']} blocks) | {r['median_s']:.1f} | {r['peak_gb']:.2f} | "
                f"{r['peak_gb'] - r['after_load_gb']:.2f} |"
            )
    e = rows["explicit"]
    for label, o in (("ours", rows["ours"]), ("ours with checkpointing", rows["ours-ckpt"])):
        if e and o:
            ratio = (o["peak_gb"] - o["after_load_gb"]) / max(e["peak_gb"] - e["after_load_gb"], 1e-9)
            rel = abs(e["grad_abs_sum"] - o["grad_abs_sum"]) / e["grad_abs_sum"]
            print(
                f"{label}: {e['median_s'] / o['median_s']:.2f}x faster, {ratio:.2f}x the memory a pass adds; "
                f"|sum|grad|| relative difference {rel:.1e}"
            )


if __name__ == "__main__":
    main()
