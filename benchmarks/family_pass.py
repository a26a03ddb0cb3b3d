"""One Attend-and-Excite guidance pass (forward + backward to the latents) per family added in issue #26
(Qwen-Image, Z-Image, PixArt-Sigma, FLUX.2 [dev], SANA), at each family's real block width with few blocks, random
weights (built on the meta device, then N(0, 0.02)) and random prompt embeddings of the real text width and a
realistic text length: the research code's explicit attention against ours. The companion of ``mmdit_pass.py``
(SD3.5 and FLUX.1), with the same variants and output.

    python benchmarks/family_pass.py --all                 # every family at 512 and 1024 px, one table
    python benchmarks/family_pass.py --arch qwenimage --size 512 [--arch sana] [--size 1024] [--repeats 3]

Each family runs through its own adapter: its tiny pipeline from ``attncontrol.testing`` with the transformer
swapped for the real-width one, ``attncontrol.prepare_run`` with ``AttendExcite(subjects=["cat", "dog"])`` on
"a cat and a dog" (so the token layout and the text length are the pipeline's own: the templated prompt for the
LLM-encoded families, FLUX.2's 512 padded positions, 300 positions for PixArt's T5 and SANA's Gemma), then the
encoded embeddings replaced by random ones of the transformer's text width. The maps come from the adapter's
default blocks; which blocks each model has and captures is in ``FAMILIES`` and printed with the table.

Variants (each in its own process, so peak RSS is its own; a variant the kernel kills is reported as such):

- ``explicit``: the research code's capture. In every captured block the layer's processor is replaced by one that
  forms each head's probability matrix explicitly, takes the layer's output from it and keeps the image->text
  part; the whole transformer runs (no early exit). Joint-attention families (Qwen-Image, Z-Image, FLUX.2): the
  (N+M)^2 softmax over all image and text keys (Z-Image's segment padding included). Cross-attention DiTs
  (PixArt-Sigma, SANA): the plain (N x M) cross-attention softmax, as Attend-and-Excite's own processor computes
  it (``get_attention_scores``); their self-attention runs its own processor in every variant (SANA's is linear
  attention: there is no self-attention matrix at all).
- ``ours``: ``run.engine.evaluate`` under ``run.installed()``. Joint families: the layer's own SDPA for the output
  and image->text probabilities from a fused log-sum-exp, for the needed text columns only. Cross-attention DiTs:
  the classic form computes the (N x M) probabilities explicitly as well (that matrix is already the small one),
  so there the comparison measures our capture's overhead and the early exit after the last captured block, not
  a different attention computation.
- ``ours-ckpt``: ours with ``checkpointing=True`` (the blocks before the last captured one recomputed in the
  backward); not run where the captured block is the first (nothing to checkpoint).

The loss is the prepared control's own (``AttendExcite``'s token softmax, smoothing and loss, times its step size
at step 0) in both, so sum |grad| of ours and explicit must agree: the correctness column. The explicit processors
read queries, keys and values through the family's attention form (the tests check those against diffusers'
processors); the probabilities, the output and the maps are computed independently of it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """A double-stream joint layer with the text first (Qwen-Image, FLUX.2), the research code's way: one explicit
    softmax over [text; image] per head, the output from it, the image->text part kept (heads averaged). ``ops``:
    the family's attention form, for the layer's queries, keys and values exactly as its processor computes them.
    The signature serves both processors: FLUX.2's passes its arguments by position, Qwen-Image's by name."""

    def __init__(self, ops, maps: list):
        self.ops, self.maps = ops, maps

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        encoder_hidden_states_mask=None,
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
    """A classic cross-attention layer (PixArt-Sigma, SANA) as Attend-and-Excite's processor computes it: diffusers'
    explicit ``get_attention_scores`` (N x M per head, the caption mask as its additive bias), the output from it;
    q/k norms over the whole projection where the layer has them (SANA's processor)."""

    def __init__(self, maps: list):
        self.maps = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
        query, key = attn.to_q(hidden_states), attn.to_k(context)
        query = attn.norm_q(query) if attn.norm_q is not None else query
        key = attn.norm_k(key) if attn.norm_k is not None else key
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), mask)
        self.maps.append(probs.view(b, attn.heads, n, -1).mean(1))
        out = torch.bmm(probs, attn.head_to_batch_dim(attn.to_v(context)))
        return _out(attn, attn.batch_to_head_dim(out))


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


def _load(path: str):
    """The object at ``module.name``."""
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _model(cls_path: str, config_name: str, **changes):
    """``model()`` of a :class:`Family`: the transformer class and its width config from ``attncontrol.testing``,
    with ``changes`` (fewer blocks)."""
    return lambda: (_load(cls_path), dict(_load(f"attncontrol.testing.{config_name}"), **changes))


def _tiny(name: str):
    return lambda: _load(f"attncontrol.testing.make_tiny_{name}_pipeline")()


def _joint(form_path: str):
    """The explicit processor factory of a text-first joint family whose attention form is at ``form_path``."""
    return lambda maps, run, n_image: ExplicitTextFirstJoint(_load(form_path), maps)


TRANSFORMERS = "diffusers.models.transformers"
PIXART_BLOCKS = 8  # of 28: the default (middle-half) blocks are 2-5, the early exit leaves 6-7 (as 21-27 of 28)
SANA_BLOCKS = 4  # of 20, all captured (its default: every block)
FLUX2_DOUBLE = 1  # of 8 double-stream blocks (captured: the default), and none of its 48 single-stream blocks

FAMILIES: dict[str, Family] = {
    "qwenimage": Family(
        "Qwen-Image width (24 heads x 128, text 3584), 2 of 60 double-stream blocks, both captured",
        _model(f"{TRANSFORMERS}.transformer_qwenimage.QwenImageTransformer2DModel", "QWENIMAGE_WIDTH_CONFIG"),
        _tiny("qwenimage"),
        lambda config: config["joint_attention_dim"],
        _joint("attncontrol.processors.complex_rotary.COMPLEX_ROTARY_JOINT"),
    ),
    "zimage": Family(
        "Z-Image width (30 heads x 128, caption 2560), 1+1 refiners and 2 of 30 main layers, the first captured",
        _model(f"{TRANSFORMERS}.transformer_z_image.ZImageTransformer2DModel", "ZIMAGE_WIDTH_CONFIG"),
        _tiny("zimage"),
        lambda config: config["cap_feat_dim"],
        lambda maps, run, n: ExplicitSegmented(run.adapter.form, maps, n, run.ctx.seq_len),
    ),
    "pixart": Family(
        f"PixArt-Sigma XL/2 (16 heads x 72, T5 4096), {PIXART_BLOCKS} of 28 blocks, 2-5 captured",
        _model(
            f"{TRANSFORMERS}.pixart_transformer_2d.PixArtTransformer2DModel",
            "PIXART_SIGMA_CONFIG",
            num_layers=PIXART_BLOCKS,
        ),
        _tiny("pixart"),
        lambda config: config["caption_channels"],
        lambda maps, run, n: ExplicitCross(maps),
        {"use_resolution_binning": False},
    ),
    "flux2": Family(
        f"FLUX.2 [dev] width (48 heads x 128, text 3 x 5120), {FLUX2_DOUBLE} of 8 double-stream blocks (captured), "
        "no single-stream block",
        _model(
            f"{TRANSFORMERS}.transformer_flux2.Flux2Transformer2DModel",
            "FLUX2_WIDTH_CONFIG",
            num_layers=FLUX2_DOUBLE,
            num_single_layers=0,
        ),
        _tiny("flux2"),
        lambda config: config["joint_attention_dim"],
        _joint("attncontrol.processors.parallel.PARALLEL_ROTARY_JOINT"),
    ),
    "sana": Family(
        f"SANA 1.6B (cross-attention 20 heads x 112, Gemma-2 2304; linear self-attention), {SANA_BLOCKS} of 20 "
        "blocks, all captured",
        _model(f"{TRANSFORMERS}.sana_transformer.SanaTransformer2DModel", "SANA_1600M_CONFIG", num_layers=SANA_BLOCKS),
        _tiny("sana"),
        lambda config: config["caption_channels"],
        lambda maps, run, n: ExplicitCross(maps),
        {"use_resolution_binning": False},
    ),
}


def empty_model(family: Family):
    """The family's real-width transformer built on the meta device and given uninitialised CPU storage (fast:
    nothing is written yet), its config, and its buffers as constructed (e.g. PixArt's sin-cos position table)."""
    from accelerate import init_empty_weights

    cls, config = family.model()
    with init_empty_weights():
        model = cls(**config)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return model.to_empty(device="cpu").eval().requires_grad_(False), config, buffers


@torch.no_grad()
def fill(model, buffers: dict) -> None:
    """Random weights, N(0, 0.02) (default initialisation of this many parameters takes minutes on a small CPU);
    the buffers back as constructed."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.normal_(0.0, 0.02)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])


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
    model, config, buffers = empty_model(family)
    run = prepared(family, model, config, args.size[0], checkpointing=args.variant == "ours-ckpt")
    grid = run.controls[0].maps.key.grid
    row: dict = {"variant": args.variant, "tokens": grid[0] * grid[1], "text_len": run.ctx.seq_len}
    if args.variant == "ours-ckpt" and not run.adapter.checkpoint_modules(run.store.last_layer):
        print(json.dumps({**row, "skipped": "nothing to checkpoint (the captured block is the first)"}))
        return
    fill(model, buffers)
    base = peak_rss_gb()
    if args.variant == "explicit":
        times, gsum, layers = run_explicit(family, run, args.repeats)
    else:
        times, gsum, layers = run_ours(run, args.repeats)
    row.update(times=times, median_s=sorted(times)[len(times) // 2], peak_gb=peak_rss_gb(), after_load_gb=base)
    print(json.dumps({**row, "grad_abs_sum": gsum, "layers": layers}))


def measure(arch: str, size: int, variant: str, repeats: int) -> dict:
    """One variant in its own process: its row, ``{"killed": True}`` when the kernel killed it, or the error."""
    cmd = [sys.executable, __file__, "--variant", variant, "--arch", arch, "--size", str(size)]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--repeats", str(repeats)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode in (-9, 137) or "can't allocate memory" in proc.stderr:
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
    if "skipped" in r:
        return f"{head} | not run: {r['skipped']} | | | | |"
    if "error" in r:
        return f"{head} | failed: {r['error']} | | | | |"
    adds = r["peak_gb"] - r["after_load_gb"]
    ratio = agree = ""
    if r["variant"] != "explicit" and explicit and "median_s" in explicit:
        ratio = f"{adds / max(explicit['peak_gb'] - explicit['after_load_gb'], 1e-9):.2f}x"
        agree = f"{abs(explicit['grad_abs_sum'] - r['grad_abs_sum']) / explicit['grad_abs_sum']:.1e}"
    return (
        f"{head} ({r['layers']} captured) | {r['median_s']:.1f} | {r['peak_gb']:.2f} | {adds:.2f} | {ratio} | {agree} |"
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
    shapes = {(a, s): (r["tokens"], r["text_len"]) for (a, s), rows in results.items() for r in rows if "tokens" in r}
    print("\nimage + text tokens: " + ", ".join(f"{a} {s} px {n} + {m}" for (a, s), (n, m) in shapes.items()))
    print(f"whole run: {seconds / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=[*FAMILIES, "all"], help="repeatable (default: all)")
    parser.add_argument("--size", action="append", type=int, help="repeatable (default: 512 and 1024)")
    parser.add_argument("--all", action="store_true", help="every family, one table (512 and 1024 px unless --size)")
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
