"""Regional prompting (issue #27): the memory and time of the regional attention against plain attention, at
FLUX.1's attention width and an SD-like cross-attention width, random tensors and random weights.

    python benchmarks/regions_pass.py                       # this CPU's subset (fp32, 16 minutes here)
    python benchmarks/regions_pass.py --device cuda --full  # the whole set (bf16; what benchmarks/gpu.sh runs)
    python benchmarks/regions_pass.py --quick               # the smallest case at reduced width (a smoke test)

Text: the base prompt plus R sub-prompts (R = 2: two boxes side by side; R = 4: the four quadrants), each its own
segment: 512 T5 tokens each on FLUX.1 (its ``max_sequence_length``), 77 CLIP tokens each on the cross-attention
layers. Image tokens N = (px / 16)^2: FLUX.1's packed latents (1024 at 512 px, 4096 at 1024 px), and the same N is
SDXL's finest attention level (64 x 64 at 1024 px, 10 heads x 64), which the cross rows stand for.

Cases (one process, one after another; each number is that call's own):

- ``joint``: one attention call at FLUX.1's width (24 heads x 128), queries and keys [text; image]
  (``RegionLayout(text_first=True)``). ``cross``: image queries over text keys, 10 heads x 64
  (``text_first=None``).
- ``double`` / ``single``: a diffusers ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` at FLUX.1's width
  (3072 = 24 x 128) with random weights and the rotary embedding of the real token ids, its processor run inside
  :class:`attncontrol.processors.regional.RegionalSDPA` as ``CaptureProcessor`` runs it; so the regional rows
  include the extra text tokens' cost in the block's linear layers.

Variants: ``plain`` (the base text only, no regions: SDPA over [base text; image]), ``no mask`` (the regional
length, one unmasked SDPA: what the longer sequence costs by itself), ``grouped`` and ``dense``
(:func:`regional_attention`'s kernels, beta 0.3), ``dense, math SDPA`` (the dense kernel with SDPA forced to its
math backend: the fallback that forms the scores, for comparison). Modes: ``fwd`` (no autograd) and ``fwd+bwd``
(queries, keys and values, or the block's inputs, require grad; one backward from a fixed random output gradient:
what a guidance pass does through every masked layer).

Memory: what the call adds to the peak over what was allocated before it (inputs and weights excluded; the output,
the saved activations and the gradients included). CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. CPU: the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
over its RSS before the call, with glibc's mmap threshold fixed at 128 KiB so that freed tensors go back to the
system and every case starts from the same RSS. Seconds: the median of up to ``--repeats`` calls (fewer where a
call is long: ``--budget`` seconds per variant after the first call).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's attncontrol, not another install's
from _common import machine  # noqa: E402

BETA = 0.3
T5, CLIP = 512, 77
JOINT_WIDTH = (24, 128)  # FLUX.1: heads x head dim
CROSS_WIDTH = (10, 64)  # SDXL's 640-channel level (SD 1.5: 8 heads, 40 to 160 wide)
VARIANTS = ("plain", "no mask", "grouped", "dense", "dense, math SDPA")
BOXES = {
    2: [[(0.0, 0.0, 0.5, 1.0)], [(0.5, 0.0, 1.0, 1.0)]],
    4: [[(0.0, 0.0, 0.5, 0.5)], [(0.5, 0.0, 1.0, 0.5)], [(0.0, 0.5, 0.5, 1.0)], [(0.5, 0.5, 1.0, 1.0)]],
}


@dataclass(frozen=True)
class Case:
    what: str  # joint | cross | double | single
    px: int
    regions: int
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    variants: tuple[str, ...] = VARIANTS[1:]


def _set(whats, sizes, regions, modes=("fwd", "fwd+bwd"), variants=None) -> list[Case]:
    """Cases; the math variant on attention calls only (a block's is its attention call's plus the same linears)."""
    out = []
    for w in whats:
        v = variants or (VARIANTS[1:] if w in ("joint", "cross") else VARIANTS[1:-1])
        out += [Case(w, px, r, modes, v) for px in sizes for r in regions]
    return out


# The whole set: a GPU measures it in about a minute.
FULL = _set(("cross", "joint", "double", "single"), (512, 1024), (2, 4))
# This CPU (fp32, one thread, shared): the cross rows and the joint rows at 512 px (the math fallback for R = 2
# only: it forms the scores, 1.4 GB forward and 2.6 GB with the backward there), at 1024 px R = 2 forward only (a
# dense fwd+bwd takes minutes there); the blocks at 512 px for R = 2, forward only (a FLUX-width block is about 113 M
# multiply-adds per token: ~10 s per forward at 512 px here).
CPU = [
    *_set(("cross",), (512, 1024), (2, 4)),
    *_set(("joint",), (512,), (2,)),
    *_set(("joint",), (512,), (4,), variants=("no mask", "grouped", "dense")),
    *_set(("joint",), (1024,), (2,), modes=("fwd",), variants=("no mask", "grouped", "dense")),
    *_set(("double", "single"), (512,), (2,), modes=("fwd",)),
]
QUICK = _set(("cross", "joint", "double", "single"), (256,), (2,))


# -- memory ------------------------------------------------------------------------------------------------------


def _fix_malloc() -> None:
    """glibc: every allocation over 128 KiB its own mapping, returned to the system when freed (the default
    threshold grows to 32 MiB after the first large free, so freed tensors would stay in the heap and hide the
    next call's peak)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


class Meter:
    """Peak memory a call adds (MB), on CUDA or on a Linux CPU (None where neither applies)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.ok = self.cuda
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                _status_mb("VmHWM")
                self.ok = True
            except OSError:
                self.ok = False

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.ok:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            self.base = _status_mb("VmRSS")

    def added_mb(self) -> float | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 1024**2
        return _status_mb("VmHWM") - self.base if self.ok else None


# -- the calls ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Width:
    """Heads x head dim of the joint (and block) and cross rows, and the text tokens per segment."""

    joint: tuple[int, int] = JOINT_WIDTH
    cross: tuple[int, int] = CROSS_WIDTH
    t5: int = T5
    clip: int = CLIP

    def text(self, what: str) -> int:
        return self.clip if what == "cross" else self.t5


QUICK_WIDTH = Width((2, 128), (2, 64), 64, 16)


def _layout(case: Case, width: Width, device):
    from attncontrol.controls.regions import region_labels
    from attncontrol.processors.regional import RegionLayout

    side = case.px // 16
    text = width.text(case.what)
    labels = region_labels(BOXES[case.regions], (side, side)).to(device)
    return RegionLayout((text,) * (1 + case.regions), labels, None if case.what == "cross" else True)


def _lengths(case: Case, variant: str, width: Width) -> tuple[int, int]:
    """(queries, keys) of the call."""
    n = (case.px // 16) ** 2
    text = width.text(case.what) * (1 if variant == "plain" else 1 + case.regions)
    return (n, text) if case.what == "cross" else (n + text, n + text)


def _sdpa_context(variant: str):
    from contextlib import nullcontext

    if variant != "dense, math SDPA":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class AttentionCall:
    """One attention call of ``case`` in ``variant``: tensors made in ``__init__`` (outside the measurement)."""

    def __init__(self, case: Case, variant: str, width: Width, device, dtype, grad: bool):
        from attncontrol.processors.regional import regional_attention

        heads, dim = width.cross if case.what == "cross" else width.joint
        lq, lk = _lengths(case, variant, width)
        g = torch.Generator(device=device).manual_seed(0)
        shape = (1, heads)
        self.q = torch.randn(*shape, lq, dim, generator=g, device=device, dtype=dtype)
        self.k = torch.randn(*shape, lk, dim, generator=g, device=device, dtype=dtype)
        self.v = torch.randn(*shape, lk, dim, generator=g, device=device, dtype=dtype)
        self.grad = grad
        if grad:
            for t in (self.q, self.k, self.v):
                t.requires_grad_(True)
            self.out_grad = torch.randn(*shape, lq, dim, generator=g, device=device, dtype=dtype)
        if variant in ("plain", "no mask"):
            self.fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        else:
            layout = _layout(case, width, device)
            _ = layout.tables  # built once per layout in a run (RegionalSDPA's layout is the run's): not timed
            kernel = "grouped" if variant == "grouped" else "dense"
            self.fn = lambda q, k, v: regional_attention(q, k, v, layout, BETA, 0, None, None, kernel)
        self.variant = variant

    def __call__(self) -> None:
        with _sdpa_context(self.variant), torch.set_grad_enabled(self.grad):
            out = self.fn(self.q, self.k, self.v)
            if self.grad:
                out.backward(self.out_grad)
        del out
        for t in (self.q, self.k, self.v):
            t.grad = None


class InMode:
    """A layer's own processor run inside :class:`RegionalSDPA`, as ``CaptureProcessor._regional`` runs it."""

    def __init__(self, own, layout, kernel: str):
        self.own, self.layout, self.kernel = own, layout, kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from attncontrol.processors.regional import RegionalSDPA

        mode = RegionalSDPA(self.layout, BETA, lambda batch: 0, self.kernel)
        with mode:
            out = self.own(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if mode.calls != 1:
            raise RuntimeError(f"the regional attention was not reached ({mode.calls} calls, {mode.other_calls} other)")
        return out


class Blocks:
    """One FluxTransformerBlock and one FluxSingleTransformerBlock at FLUX.1's width, random weights N(0, 0.02)
    (built on the meta device: default initialisation of ~480 M parameters takes minutes on a small CPU)."""

    def __init__(self, width: Width, device, dtype):
        self.width = width
        from accelerate import init_empty_weights
        from diffusers.models.transformers.transformer_flux import (
            FluxPosEmbed,
            FluxSingleTransformerBlock,
            FluxTransformerBlock,
        )

        heads, head_dim = width.joint
        self.dim = heads * head_dim
        with init_empty_weights():
            blocks = {
                "double": FluxTransformerBlock(self.dim, heads, head_dim),
                "single": FluxSingleTransformerBlock(self.dim, heads, head_dim),
            }
        g = torch.Generator(device="cpu").manual_seed(0)
        for name, block in blocks.items():
            block.to_empty(device=device)
            with torch.no_grad():
                for p in block.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            blocks[name] = block.to(dtype).eval().requires_grad_(False)
        self.blocks = blocks
        self.own = {name: b.attn.processor for name, b in blocks.items()}
        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
        self.device, self.dtype = device, dtype

    def rotary(self, text: int, side: int):
        from diffusers import FluxPipeline

        img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, self.device, torch.float32)
        ids = torch.cat([torch.zeros(text, 3, device=self.device), img_ids])
        return self.pos_embed(ids)


class BlockCall:
    def __init__(self, case: Case, variant: str, blocks: Blocks, grad: bool):
        if variant == "dense, math SDPA":
            raise ValueError("blocks: no math variant")
        block = blocks.blocks[case.what]
        own = blocks.own[case.what]
        if variant in ("plain", "no mask"):
            block.attn.set_processor(own)
        else:
            kernel = "grouped" if variant == "grouped" else "dense"
            block.attn.set_processor(InMode(own, _layout(case, blocks.width, blocks.device), kernel))
        side = case.px // 16
        text = blocks.width.t5 * (1 if variant == "plain" else 1 + case.regions)
        g = torch.Generator(device=blocks.device).manual_seed(0)
        kw = {"device": blocks.device, "dtype": blocks.dtype, "generator": g}
        self.image = torch.randn(1, side * side, blocks.dim, **kw)
        self.text = torch.randn(1, text, blocks.dim, **kw)
        self.temb = torch.randn(1, blocks.dim, **kw)
        self.rotary = blocks.rotary(text, side)
        self.grad = grad
        if grad:
            self.image.requires_grad_(True)
            self.text.requires_grad_(True)
            self.out_grads = (torch.randn_like(self.text), torch.randn_like(self.image))
        self.block = block

    def __call__(self) -> None:
        with torch.set_grad_enabled(self.grad):
            outs = self.block(self.image, self.text, self.temb, image_rotary_emb=self.rotary)
            if self.grad:
                torch.autograd.backward(outs, self.out_grads)
        del outs
        self.image.grad = self.text.grad = None


# -- measuring ---------------------------------------------------------------------------------------------------


@dataclass
class Result:
    mb: float | None = None
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(make, meter: Meter, device, repeats: int, budget: float, warmup: bool) -> Result:
    """Memory from the first measured call, seconds the median of up to ``repeats`` calls."""
    try:
        call = make()
        if warmup:
            call()
        meter.start()
        t0 = time.perf_counter()
        call()
        _sync(device)
        seconds = [time.perf_counter() - t0]
        result = Result(meter.added_mb(), seconds)
        while len(seconds) < repeats and sum(seconds) < budget:
            t0 = time.perf_counter()
            call()
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        return result
    except torch.OutOfMemoryError:
        return Result(error="out of memory")
    finally:
        call = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(cases: list[Case], width: Width, device, dtype, repeats: int, budget: float, log) -> dict:
    meter = Meter(device)
    blocks = Blocks(width, device, dtype) if any(c.what in ("double", "single") for c in cases) else None
    gc.collect()
    gc.freeze()  # the imported modules' objects out of every later collection (a full one takes ~0.5 s here)
    warm_each = device.type == "cuda"
    if not warm_each and width == Width():  # library set-up (oneDNN, the SDPA kernels' first calls) not measured
        for case in QUICK:
            if case.what in ("joint", "cross"):
                for variant in VARIANTS:
                    for grad in (False, True):
                        AttentionCall(case, variant, QUICK_WIDTH, device, dtype, grad)()
    results: dict = {}
    for case in cases:
        for mode in case.modes:
            grad = mode == "fwd+bwd"
            for variant in ("plain", *case.variants):
                key = (case.what, case.px, 0 if variant == "plain" else case.regions, variant, mode)
                if key in results:
                    continue
                if case.what in ("double", "single"):
                    make = partial(BlockCall, case, variant, blocks, grad)
                else:
                    make = partial(AttentionCall, case, variant, width, device, dtype, grad)
                t0 = time.perf_counter()
                results[key] = r = measure(make, meter, device, repeats, budget, warm_each)
                log(
                    f"{case.what} {case.px}px R={key[2]} {variant} {mode}: "
                    + (r.error or f"{r.mb if r.mb is None else round(r.mb, 1)} MB, {r.median:.3f} s x{len(r.seconds)}")
                    + f" ({time.perf_counter() - t0:.1f} s)"
                )
    return results


# -- the tables --------------------------------------------------------------------------------------------------


def _cell(r: Result | None, plain: Result | None, what: str) -> tuple[str, str]:
    if r is None:
        return "", ""
    if r.error:
        return r.error, ""
    if what == "mb":
        if r.mb is None:
            return "n/a", ""
        ratio = f"{r.mb / plain.mb:.2f}x" if plain and plain.mb and not plain.error and plain.mb > 0 else ""
        return f"{r.mb:.0f}", ratio
    ratio = f"{r.median / plain.median:.2f}x" if plain and plain.seconds else ""
    return f"{r.median:.3f}" if r.median < 10 else f"{r.median:.1f}", ratio


def _scores_mb(case: Case, variant: str, width: Width, nbytes: int) -> float:
    heads = (width.cross if case.what == "cross" else width.joint)[0]
    lq, lk = _lengths(case, variant, width)
    return heads * lq * lk * nbytes / 1024**2


def tables(cases: list[Case], results: dict, width: Width, nbytes: int) -> str:
    titles = {
        "joint": "Joint attention call, FLUX.1 width ({}x{}), [text; image]",
        "cross": "Cross-attention call, SD-like ({}x{}), image queries over {} (1 + R) CLIP keys",
        "double": "FluxTransformerBlock ({}x{}), random weights, the block's own processor in RegionalSDPA",
        "single": "FluxSingleTransformerBlock ({}x{}), random weights, the block's own processor in RegionalSDPA",
    }
    lines = []
    for what, title in titles.items():
        mine = [c for c in cases if c.what == what]
        if not mine:
            continue
        modes = [m for m in ("fwd", "fwd+bwd") if any(m in c.modes for c in mine)]
        w = width.cross if what == "cross" else width.joint
        lines += ["", title.format(*w, width.clip) + ":", ""]
        head = "| px | R | queries x keys | variant | scores if formed (MB/branch) |"
        rule = "|---|---|---|---|---|"
        for mode in modes:
            head += f" {mode}: adds (MB) | vs plain | {mode}: s | vs plain |"
            rule += "---|---|---|---|"
        lines += [head, rule]
        done = set()
        for case in mine:
            for variant in ("plain", *case.variants):
                r_count = 0 if variant == "plain" else case.regions
                if (case.px, r_count, variant) in done:
                    continue
                done.add((case.px, r_count, variant))
                lq, lk = _lengths(case, variant, width)
                scores = _scores_mb(case, variant, width, nbytes)
                row = f"| {case.px} | {r_count or '-'} | {lq} x {lk} | {variant} | {scores:.0f} |"
                for mode in modes:
                    r = results.get((what, case.px, r_count, variant, mode))
                    plain = results.get((what, case.px, 0, "plain", mode))
                    row += " {} | {} |".format(*_cell(r, plain, "mb"))
                    row += " {} | {} |".format(*_cell(r, plain, "s"))
                lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--full", action="store_true", help="the whole set (the default on CUDA)")
    parser.add_argument("--quick", action="store_true", help="the smallest case at reduced width (a smoke test)")
    parser.add_argument("--what", nargs="+", choices=["joint", "cross", "double", "single"], help="only these rows")
    parser.add_argument("--sizes", nargs="+", type=int, help="only these sizes (px) of the chosen set")
    parser.add_argument("--regions", nargs="+", type=int, choices=sorted(BOXES), help="only these R")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per variant for repeats after the first")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    _fix_malloc()
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    if args.quick:
        cases, width, repeats = QUICK, QUICK_WIDTH, 1
    else:
        cases, width, repeats = (FULL if args.full or device.type == "cuda" else CPU), Width(), args.repeats
    cases = [
        c
        for c in cases
        if (not args.what or c.what in args.what)
        and (not args.sizes or c.px in args.sizes)
        and (not args.regions or c.regions in args.regions)
    ]
    if not cases:
        parser.error("no case left after --what/--sizes/--regions")
    t0 = time.perf_counter()
    results = run(cases, width, device, dtype, repeats, args.budget, lambda s: print(s, file=sys.stderr, flush=True))
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
        memory = "torch.cuda.max_memory_allocated over the allocation before the call"
    else:
        where = f"cpu ({machine()}), {torch.get_num_threads()} thread(s)"
        memory = "peak RSS (VmHWM) over the RSS before the call"
    print(
        f"Regional prompting vs plain attention, beta {BETA}, batch 1, {dtype_name}, {where}; "
        f"adds: {memory}; s: median of up to {repeats} calls"
    )
    print(tables(cases, results, width, torch.finfo(dtype).bits // 8))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
