"""SynGen (Rassin et al., NeurIPS 2023): bind each modifier to its noun (a symmetric KL between their attention
maps) and keep both apart from the other prompt tokens. Constants from the official code
(RoyiRa/Linguistic-Binding-in-Diffusion-Models: ``compute_loss.py``, ``syngen_diffusion_pipeline.py``, ``run.py``).
The (modifier, noun) pairs come from the subjects, not from a parser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError
from ..losses.syngen import syngen_group_loss
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, binding_groups
from .options import check_fields


@with_aliases
@dataclass
class SynGen(GuidanceOptions):
    """SynGen: ``L = sum_groups sum_m [d(m, n) - 1/2 (mean_u d(m, u) + mean_u d(n, u))]``, d the symmetric KL of
    spatially normalised maps, u every prompt token outside the group (the other groups' words included; no
    start/end token, no padding); ``z <- z - step_size * grad L``.

    Args:
        subjects: phrases whose leading words modify their last word (``"red car"``: red -> car); a single word is
            a noun without modifiers (only the push away from the other tokens).
        bindings: more modifiers per noun, ``{"car": ["red", "shiny"]}``.
        step_size: constant step (official: 20; no sqrt schedule, no refinement).
        stop (alias ``max_iter_to_alter``): updates at steps ``start .. stop - 1`` (official: 25 of 50).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps' level and layers; SynGen itself uses the raw averaged attention (no token softmax, no
            smoothing), as the official code.
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    """

    method: ClassVar[str] = "syngen"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    subjects: list = field(default_factory=list)
    bindings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    step_size: float = 20.0
    stop: int | float | None = field(default=25, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        if not self.step_size > 0:
            raise OptionError(f"step_size must be > 0, got {self.step_size}")
        self.validate_map_options()
        self.validate_update()

    def prepare(self, ctx: ControlContext) -> PreparedSynGen:
        return PreparedSynGen(self, ctx)


class PreparedSynGen(PreparedControl):
    def __init__(self, cfg: SynGen, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.groups = binding_groups(ctx, cfg.subjects, dict(cfg.bindings))
        prompt_tokens = ctx.keep_mask(True)  # every prompt token, without start/end tokens and padding
        nouns = [[noun for _, noun in g] for g in self.groups]
        columns = prompt_tokens.any(0)  # its loss reads every prompt token, not only the nouns
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects, positions=nouns), cfg, ctx, columns=lambda: columns)
        # Per image, per group: the tokens that group is pushed away from -- every prompt token outside the group,
        # the other groups' modifiers and nouns included (official: compute_loss.py:_get_outside_indices over
        # get_attention_map_index_to_wordpiece's positions 1 .. len(ids) - 2, i.e. no start/end token, no padding).
        self.others = []
        for b, groups in enumerate(self.groups):
            tokens = prompt_tokens[b].nonzero().flatten().tolist()
            outside = []
            for mods, noun in groups:
                mine = {p for w in (*mods, noun) for p in w}
                outside.append([p for p in tokens if p not in mine])
            self.others.append(outside)

    def step_size(self, step: int) -> float:
        return float(self.cfg.step_size)

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        m = maps[self.maps.key]
        losses = []
        for row, b in enumerate(images):
            a = m[row]  # (rows, cols, tokens): raw averaged attention

            def word(w, a=a):
                return [a[..., p] for p in w]

            total = a.new_zeros(())
            for (mods, noun), outside in zip(self.groups[b], self.others[b]):
                others = [a[..., p] for p in outside]
                total = total + syngen_group_loss([word(w) for w in mods], word(noun), others)
            losses.append(total)
        return torch.stack(losses)
