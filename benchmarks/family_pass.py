"""One Attend-and-Excite guidance pass (forward + backward to the latents) per family added in issue #26, at each
family's real block width (random weights: initialised on the meta device, then N(0, 0.02)) with few blocks, and
random prompt embeddings of the real text width and a realistic text length: the research code's explicit
attention against ours. The companion of ``mmdit_pass.py`` (SD3.5 and FLUX.1), with the same variants and output.

    python benchmarks/family_pass.py --all                      # every family, 512 and 1024 px, one table
    python benchmarks/family_pass.py --arch qwenimage --size 512 [--size 1024] [--repeats 1]

Each family runs through its own adapter: the family's tiny pipeline from ``attncontrol.testing`` with its
transformer swapped for the real-width one, ``attncontrol.prepare_run`` with ``AttendExcite(subjects=["cat",
"dog"])`` on "a cat and a dog" (so the token layout and the text length are the pipeline's own: the templated
prompt for the LLM-encoded families, 300 T5 positions for PixArt), then the encoded embeddings replaced by random
ones of the real text width. The maps come from the adapter's default blocks.

Variants (each in its own process, so peak RSS is its own; a variant the kernel kills is reported as such):

- ``explicit``: the research code's capture. In every captured block the layer's processor is replaced by one that
  forms the full probability matrix of each head explicitly, takes the layer's output from it and keeps the
  image->text part; the full transformer runs. Joint-attention families (Qwen-Image, Z-Image): the (N+M)^2 softmax
  over all image and text keys (Z-Image's padding included). Cross-attention DiTs (PixArt-Sigma): the plain
  (N x M) cross-attention softmax, as Attend-and-Excite's own processor computes it (``get_attention_scores``).
- ``ours``: ``run.engine.evaluate`` under ``run.installed()``: joint families get the layer's own SDPA for the
  output and image->text probabilities from a fused log-sum-exp for the needed text columns only; classic cross
  layers compute their (N x M) probabilities explicitly too (that is already the small matrix), so there the
  difference is the early exit after the last captured block.
- ``ours-ckpt``: ours with ``checkpointing=True`` (the blocks before the last captured one recomputed).

The loss is the prepared control's own (``AttendExcite``'s token softmax, smoothing and loss, times its step size
at step 0) in both, so |sum|grad|| of ours and explicit must agree: the correctness column.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, machine, peak_rss_gb  # noqa: E402

PROMPT = "a cat and a dog"
SUBJECTS = ["cat", "dog"]
VARIANTS = ("explicit", "ours", "ours-ckpt")
SIZES = (512, 1024)


def _out(attn, x: torch.Tensor) -> torch.Tensor:
    """The layer's output projection (and its dropout, an identity in eval mode)."""
    x = attn.to_out[0](x)
    return attn.to_out[1](x) if len(attn.to_out) > 1 else x


def _softmax(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit (B, H, L, L) probabilities of every query over every key (masked keys: probability 0)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], -math.inf)
    return torch.softmax(scores, dim=-1)


class ExplicitTextFirstJoint:
    """Qwen-Image's double-stream joint attention, the research code's way: one explicit softmax over [text;
    image] per head, the output from it, the image->text part kept (heads averaged)."""

    def __init__(self, maps: list):
        from attncontrol.processors.complex_rotary import COMPLEX_ROTARY_JOINT

        self.ops, self.maps = COMPLEX_ROTARY_JOINT, maps

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        args = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": encoder_hidden_states,
            "image_rotary_emb": image_rotary_emb,
        }
        q, k, m = self.ops.query_key(attn, args)
        mask = None
        if encoder_hidden_states_mask is not None:
            mask = torch.cat([encoder_hidden_states_mask.bool(), torch.ones_like(hidden_states[..., 0]).bool()], 1)
        probs = _softmax(q, k, mask)
        self.maps.append(probs[:, :, m:, :m].mean(1))
        out = (probs @ self.ops.values(attn, args)).transpose(1, 2).flatten(2)
        return _out(attn, out[:, m:]), attn.to_add_out(out[:, :m])


class ExplicitSegmented:
    """Z-Image's single-stream attention over [image; image padding; caption; caption padding], the research
    code's way: one explicit softmax over every key per head, the output from it, the image -> caption-part
    probabilities kept (the caption part starts after the padded image segment)."""

    def __init__(self, form, maps: list, n_image: int, text_len: int):
        self.form, self.maps, self.n_image, self.text_len = form, maps, n_image, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        args = {"hidden_states": hidden_states, "freqs_cis": freqs_cis}
        q, k, _ = self.form.query_key(attn, args)
        probs = _softmax(q, k, attention_mask)
        start = self.form.text_start(self.n_image)
        self.maps.append(probs[:, :, : self.n_image, start : start + self.text_len].mean(1))
        out = (probs @ self.form.values(attn, args)).transpose(1, 2).flatten(2)
        return _out(attn, out)


class ExplicitCross:
    """A classic cross-attention layer as Attend-and-Excite's processor computes it: diffusers' explicit
    ``get_attention_scores`` (N x M per head, the caption mask as its additive bias), the output from it."""

    def __init__(self, maps: list):
        self.maps = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, mask)
        self.maps.append(probs.view(b, attn.heads, n, -1).mean(1))
        return _out(attn, attn.batch_to_head_dim(torch.bmm(probs, value)))


@dataclass(frozen=True)
class Family:
    """How to build one family's benchmark: its real-width transformer (``model()``: class and config), its tiny
    pipeline, the text width its transformer reads, its explicit processor (``explicit(maps, run, n_image)``), and
    what ``prepare_run`` needs beyond the size."""

    label: str
    model: Callable[[], tuple[type, dict]]
    tiny: Callable[[], Any]
    text_width: Callable[[dict], int]
    explicit: Callable[[list, Any, int], Any]
    run_kwargs: dict = field(default_factory=dict)


def _qwenimage_model():
    from diffusers import QwenImageTransformer2DModel

    from attncontrol.testing import QWENIMAGE_WIDTH_CONFIG

    return QwenImageTransformer2DModel, dict(QWENIMAGE_WIDTH_CONFIG)


def _zimage_model():
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

    from attncontrol.testing import ZIMAGE_WIDTH_CONFIG

    return ZImageTransformer2DModel, dict(ZIMAGE_WIDTH_CONFIG)


PIXART_BLOCKS = 8  # of 28: the default (middle-half) blocks are 2-5, the early exit leaves 6-7 (as 21-27 of 28)


def _pixart_model():
    from diffusers import PixArtTransformer2DModel

    from attncontrol.testing import PIXART_SIGMA_CONFIG

    return PixArtTransformer2DModel, dict(PIXART_SIGMA_CONFIG, num_layers=PIXART_BLOCKS)


def _tiny(name: str):
    def build():
        import attncontrol.testing as testing

        return getattr(testing, f"make_tiny_{name}_pipeline")()

    return build


FAMILIES: dict[str, Family] = {
    "qwenimage": Family(
        "Qwen-Image width (24 heads x 128, text 3584), 2 of 60 double-stream blocks, all captured",
        _qwenimage_model,
        _tiny("qwenimage"),
        lambda config: config["joint_attention_dim"],
        lambda maps, run, n: ExplicitTextFirstJoint(maps),
    ),
    "zimage": Family(
        "Z-Image width (30 heads x 128, caption 2560), 1+1 refiners and 2 of 30 main layers, the first captured",
        _zimage_model,
        _tiny("zimage"),
        lambda config: config["cap_feat_dim"],
        lambda maps, run, n: ExplicitSegmented(run.adapter.form, maps, n, run.ctx.seq_len),
    ),
    "pixart": Family(
        f"PixArt-Sigma XL/2 (16 heads x 72, T5 4096), {PIXART_BLOCKS} of 28 blocks, 2-5 captured",
        _pixart_model,
        _tiny("pixart"),
        lambda config: config["caption_channels"],
        lambda maps, run, n: ExplicitCross(maps),
        {"use_resolution_binning": False},
    ),
}


def random_model(family: Family):
    """The family's real-width transformer: parameters initialised on the meta device, then filled with
    N(0, 0.02); buffers (e.g. PixArt's sin-cos position table) keep their constructed values."""
    from accelerate import init_empty_weights

    cls, config = family.model()
    torch.manual_seed(0)
    with init_empty_weights():
        model = cls(**config)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return model.eval().requires_grad_(False), config


def prepared(family: Family, model, config: dict, size: int, checkpointing: bool = False):
    """``prepare_run`` on the family's tiny pipeline holding the real-width transformer; its encoded prompt
    embeddings replaced by random ones of the transformer's text width (same length, same masks)."""
    import attncontrol
    from attncontrol import AttendExcite

    pipe = family.tiny()
    pipe.transformer = model
    run = attncontrol.prepare_run(
        pipe,
        PROMPT,
        [AttendExcite(subjects=SUBJECTS)],
        height=size,
        width=size,
        num_inference_steps=28,
        generator=torch.Generator().manual_seed(0),
        checkpointing=checkpointing,
        **family.run_kwargs,
    )
    text = run.cond["encoder_hidden_states"]
    g = torch.Generator().manual_seed(1)
    run.cond["encoder_hidden_states"] = torch.randn(*text.shape[:-1], family.text_width(config), generator=g)
    return run


def run_ours(run, repeats: int):
    latents = run.draw_latents()
    times = []
    with run.installed(), torch.enable_grad():
        for _ in range(repeats):
            with Timer() as timer:
                p = run.engine.evaluate(latents, 0)
                (grad,) = torch.autograd.grad(p.objective.sum(), [p.leaf])
            times.append(timer.seconds)
    key = run.controls[0].maps.key
    return times, float(grad.abs().sum()), len(run.engine.layer_names[key])


def run_explicit(family: Family, run, repeats: int):
    from attncontrol.controls.vocabulary import StepInfo

    control = run.controls[0]
    key = control.maps.key
    names = run.engine.layer_names[key]
    maps: list = []
    denoiser = run.adapter.denoiser
    procs = dict(denoiser.attn_processors)
    for name in names:
        procs[name] = family.explicit(maps, run, key.grid[0] * key.grid[1])
    denoiser.set_attn_processor(procs)
    latents = run.draw_latents()
    info = StepInfo(index=0, timestep=float(run.timesteps[0]), total=run.num_steps)
    step_size = control.plan(0).step_size
    times = []
    for _ in range(repeats):
        maps.clear()
        with Timer() as timer, torch.enable_grad():
            leaf = latents.detach().clone().requires_grad_(True)
            run.adapter.guidance_forward(leaf, run.timesteps[0], run.cond, run.attention_kwargs)
            avg = torch.stack(maps).mean(0).view(1, *key.grid, -1)
            loss = control.evaluate({key: avg}, [0], info, [None]).loss
            (grad,) = torch.autograd.grad((step_size * loss).sum(), [leaf])
        times.append(timer.seconds)
    return times, float(grad.abs().sum()), len(maps)


def child(args) -> None:
    family = FAMILIES[args.arch[0]]
    model, config = random_model(family)
    run = prepared(family, model, config, args.size[0], checkpointing=args.variant == "ours-ckpt")
    base = peak_rss_gb()
    if args.variant == "explicit":
        times, gsum, layers = run_explicit(family, run, args.repeats)
    else:
        times, gsum, layers = run_ours(run, args.repeats)
    row = {
        "variant": args.variant,
        "times": times,
        "median_s": sorted(times)[len(times) // 2],
        "peak_gb": peak_rss_gb(),
        "after_load_gb": base,
        "grad_abs_sum": gsum,
        "layers": layers,
        "text_len": run.ctx.seq_len,
        "tokens": run.ctx.latent_hw[0] * run.ctx.latent_hw[1] // 4,
    }
    print(json.dumps(row))


def measure(arch: str, size: int, variant: str, repeats: int) -> dict:
    """One variant in its own process: its row, ``{"killed": True}`` when the kernel killed it, or the error."""
    cmd = [sys.executable, __file__, "--variant", variant, "--arch", arch, "--size", str(size)]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--repeats", str(repeats)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode in (-9, 137):
        return {"variant": variant, "killed": True, "wall_s": wall}
    if proc.returncode:
        print(f"{arch} {size} {variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"variant": variant, "error": last[:120], "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


LABELS = {
    "explicit": "explicit (research code)",
    "ours": "attncontrol",
    "ours-ckpt": "attncontrol, `checkpointing=True`",
}


def _row(arch: str, size: int, r: dict, explicit: dict) -> str:
    head = f"| {arch} | {size} | {LABELS[r['variant']]}"
    if r.get("killed"):
        return f"{head} | killed: out of memory | | | | |"
    if "error" in r:
        return f"{head} | failed: {r['error']} | | | | |"
    adds = r["peak_gb"] - r["after_load_gb"]
    ratio = agree = ""
    if r["variant"] != "explicit" and explicit and "median_s" in explicit:
        ratio = f"{adds / max(explicit['peak_gb'] - explicit['after_load_gb'], 1e-9):.2f}x"
        agree = f"{abs(explicit['grad_abs_sum'] - r['grad_abs_sum']) / explicit['grad_abs_sum']:.1e}"
    return (
        f"{head} ({r['layers']} blocks) | {r['median_s']:.1f} | {r['peak_gb']:.2f} | {adds:.2f} | {ratio} | {agree} |"
    )


def report(results: dict, repeats: int, seconds: float) -> None:
    print(f"A&E guidance pass, random weights, batch 1, fp32, cpu ({machine()}), median of {repeats}")
    for arch in dict.fromkeys(a for a, _ in results):
        print(f"- {arch}: {FAMILIES[arch].label}")
    print(
        "\n| family | px | approach | s/pass | peak RSS (GB) | a pass adds (GB) | adds vs explicit "
        "| sum abs grad vs explicit (rel. diff.) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (arch, size), rows in results.items():
        explicit = next((r for r in rows if r["variant"] == "explicit"), {})
        for r in rows:
            print(_row(arch, size, r, explicit))
    lengths = {f"{a} {s}": (r.get("tokens"), r.get("text_len")) for (a, s), rows in results.items() for r in rows}
    print("\nimage tokens, text tokens: " + ", ".join(f"{k}: {v}" for k, v in lengths.items() if v[0]))
    print(f"whole run: {seconds / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=[*FAMILIES, "all"], help="repeatable (default: all)")
    parser.add_argument("--size", action="append", type=int, help="repeatable (default: 512 and 1024)")
    parser.add_argument("--all", action="store_true", help="every family at 512 and 1024 px, one table")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.all or not args.arch or "all" in args.arch:
        args.arch = list(FAMILIES)
    args.size = args.size or list(SIZES)
    if any(s % 16 for s in args.size):
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    if args.variant:
        return child(args)
    start = time.perf_counter()
    results = {}
    for arch in args.arch:
        for size in args.size:
            results[(arch, size)] = [measure(arch, size, v, args.repeats) for v in VARIANTS]
            print(f"{arch} {size}: " + ", ".join(f"{r['variant']} {r['wall_s']:.0f} s" for r in results[(arch, size)]))
    report(results, args.repeats, time.perf_counter() - start)


if __name__ == "__main__":
    main()
