"""Where the time of one A&E guidance pass goes: torch.profiler over one pass (after a warm-up pass) on the
full-size SD 1.5 UNet architecture (random weights), batch 1, printed as tables: forward / loss / backward,
per UNet block, per kind of layer, and the top operators.

    python benchmarks/profile_pass.py [--size 512] [--dtype fp32] [--checkpointing] [--top 15]

Forward time is attributed through labels pushed by module hooks (block, then the innermost of self-attention,
cross-attention, feed-forward, resnet, resample, transformer norms/projections). Backward time is attributed
to the forward operator that created each autograd node (profiler sequence numbers), hence to its block and
kind. With --checkpointing the recompute runs inside the backward and is reported on its own line as well.
CPU only (the labels are CPU ranges).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import full_size_unet, machine  # noqa: E402
from guidance_pass import DTYPES, ours_engine  # noqa: E402

BLOCK, KIND, PHASE = "block::", "kind::", "phase::"
EVAL = "autograd::engine::evaluate_function: "


def _kind(name: str, module) -> str | None:
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, Attention):
        return "cross-attention" if name.endswith("attn2") else "self-attention"
    if isinstance(module, FeedForward):
        return "feed-forward"
    if isinstance(module, ResnetBlock2D):
        return "resnet"
    if isinstance(module, (Downsample2D, Upsample2D)):
        return "resample"
    if isinstance(module, Transformer2DModel):
        return "transformer norms/projections"
    return None


class Labels:
    """Profiler ranges opened by forward pre-hooks and closed by forward hooks; ranges left open by the early
    exit (an exception skips the forward hooks) are closed by :meth:`close_all`."""

    def __init__(self, unet):
        self.open: list[record_function] = []
        self.handles = []
        blocks = [("time embedding", unet.time_embedding), ("conv_in", unet.conv_in)]
        blocks += [(f"down_blocks.{k}", b) for k, b in enumerate(unet.down_blocks)]
        blocks += [("mid_block", unet.mid_block)] + [(f"up_blocks.{k}", b) for k, b in enumerate(unet.up_blocks)]
        # Each label on the module and on all its submodules: a checkpoint recompute calls a layer's forward
        # directly, without its hooks, and its submodules' hooks are the ones that still fire.
        for label, block in blocks:
            for module in block.modules():
                self._hook(module, BLOCK + label)
        for name, module in unet.named_modules():  # parents first, so the innermost kind is pushed last
            kind = _kind(name, module)
            if kind:
                for sub in module.modules():
                    self._hook(sub, KIND + kind)

    def _hook(self, module, label):
        def enter(*args):
            rf = record_function(label)
            rf.__enter__()
            self.open.append(rf)

        def leave(*args):
            self.open.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def close_all(self):
        while self.open:
            self.open.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def _labels_of(event) -> tuple[str, str, str, object]:
    """(phase, block, kind, autograd node event) of an operator: its innermost enclosing labels; the node event
    (backward only) is the evaluate_function range it runs in, None when a block label is nearer (a recompute)."""
    phase = block = kind = node = None
    e = event
    while e is not None:
        name = e.name
        if name.startswith(EVAL):
            if node is None and block is None and kind is None:
                node = e
        elif kind is None and name.startswith(KIND):
            kind = name[len(KIND) :]
        elif block is None and name.startswith(BLOCK):
            block = name[len(BLOCK) :]
        elif phase is None and name.startswith(PHASE):
            phase = name[len(PHASE) :]
        e = e.cpu_parent
    return phase or "?", block or "(outside the UNet)", kind or "other (convs, norms, time embedding)", node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    unet = full_size_unet(dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(dtype)
    cond = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(dtype)}
    engine, control, stack = ours_engine(unet, latents, cond, 500, args.checkpointing)
    labels = Labels(unet)

    def one_pass():
        with record_function(PHASE + "forward"):
            try:
                p = engine.evaluate(latents, 0, [0])
                leaf, objective = p.leaf, p.objective
            finally:
                labels.close_all()
        with record_function(PHASE + "backward"):
            torch.autograd.grad(objective.sum() / control.plan(0).step_size, [leaf])

    with stack:
        one_pass()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_pass()
    labels.remove()

    events = list(prof.events())
    phases = {e.name[len(PHASE) :]: e.cpu_time_total / 1e6 for e in events if e.name.startswith(PHASE)}
    total = sum(phases.values())
    # Every operator's self time, by its labels. Forward: the labels it ran under. Backward: those of the forward
    # operator that created its autograd node (same sequence number); a recompute runs under its own labels.
    fwd, bwd, rec = defaultdict(float), defaultdict(float), defaultdict(float)
    by_seq, pending = {}, []
    loss_s = 0.0
    for e in events:
        if e.name.startswith((PHASE, BLOCK, KIND)):
            continue
        phase, block, kind, node = _labels_of(e)
        seconds = e.self_cpu_time_total / 1e6
        if phase == "forward":
            if e.sequence_nr >= 0 and not e.name.startswith(EVAL):
                by_seq.setdefault(e.sequence_nr, (block, kind))
            fwd[(block, kind)] += seconds
            loss_s += seconds if block == "(outside the UNet)" else 0.0
        elif phase == "backward" and node is None and block != "(outside the UNet)":
            rec[(block, kind)] += seconds
        elif phase == "backward":
            pending.append((node, seconds))
    for node, seconds in pending:
        key = by_seq.get(node.sequence_nr) if node is not None else None
        bwd[key or ("(backward engine, unattributed)",) * 2] += seconds
    recompute = sum(rec.values())

    def table(title, key):
        rows = defaultdict(lambda: [0.0, 0.0, 0.0])
        for col, part in enumerate((fwd, bwd, rec)):
            for k, v in part.items():
                rows[key(k)][col] += v
        head = (
            "| forward s | backward s | recompute s | total s | % of pass |"
            if rec
            else "| forward s | backward s | total s | % of pass |"
        )
        print(f"\n{title}\n\n| {title.split()[-1]} {head}\n{'|---' * head.count('|')}|")
        for name, cols in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
            cells = cols if rec else cols[:2]
            print(
                f"| {name} | "
                + " | ".join(f"{c:.2f}" for c in cells)
                + f" | {sum(cols):.2f} | {100 * sum(cols) / total:.1f} |"
            )

    print(
        f"One A&E guidance pass under torch.profiler, full-size SD 1.5 UNet, {args.size} px, batch 1, {args.dtype}, "
        f"cpu ({machine()}){', gradient checkpointing' if args.checkpointing else ''}"
    )
    print("\n| phase | seconds | % |\n|---|---|---|")
    for name, s in phases.items():
        print(f"| {name} | {s:.2f} | {100 * s / total:.1f} |")
    print(f"\n(forward includes the loss on the maps, {loss_s:.3f} s; profiled total {total:.2f} s)")
    if args.checkpointing:
        print(f"(backward includes the recompute of the checkpointed blocks, {recompute:.2f} s)")
    table("Per UNet block", lambda k: k[0])
    table("Per layer kind", lambda k: k[1])
    print(f"\nTop {args.top} operators by self time (whole pass)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
