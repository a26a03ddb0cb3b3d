"""Divide & Bind (Li et al., BMVC 2023): divide subjects apart by maximising each subject map's total variation
(attendance) and bind attributes to their nouns by a Jensen-Shannon divergence. Constants from the official code
(boschresearch/Divide-and-Bind: ``pipeline_divide_and_bind.py``, ``utils/test_utils.py:default_param``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import F, torch
from ..errors import OptionError
from ..limits import check_count
from ..losses.divide_bind import divide_bind_loss
from ..ops import gaussian_smooth, token_softmax
from ..store import MapKey
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, binding_groups, validate_step_schedule
from .options import check_fields


def _thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.2, 20: 0.3}


@with_aliases
@dataclass
class DivideBind(GuidanceOptions):
    """Divide & Bind: ``L = max_j (-TV(S_j) + w_i * JSD(S_j, A_j))``, ``z <- z - alpha_i * grad L``.

    Args:
        subjects: nouns, or phrases whose leading words are the noun's attributes (``"red car"``: attribute red).
        bindings: more attributes per noun, ``{"car": ["red", "shiny"]}`` (also for nouns that are subjects).
        stop (alias ``max_iter_to_alter``): latents are updated at steps ``start .. stop - 1`` (official: 25).
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, steps)[i])`` (20, (1, 0.5)).
        thresholds: ``{step: T}``: refine while the smallest subject TV < T (official: {0: 0.05, 10: 0.2, 20: 0.3}).
        max_refinement_steps, first_refinement_steps: refinement caps after step 0 and at step 0 (official: 20, 50;
            at most 1000).
        tv: "official" (as coded: the vertical term compares the last row with every row) or "neighbour".
        attribute_levels: "finer": attribute maps from the cross-attention levels finer than the subject maps
            (64x64 and 32x32 at 512 px), nearest-resized to the subject grid, as the official code; "same".
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps (:class:`~attncontrol.controls.common.MapOptions`).
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    """

    method: ClassVar[str] = "divide-bind"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    subjects: list = field(default_factory=list)
    bindings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    thresholds: dict[int, float] = field(default_factory=_thresholds)
    max_refinement_steps: int = 20
    first_refinement_steps: int = 50
    tv: str = "official"
    attribute_levels: str = "finer"
    stop: int | float | None = field(default=25, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        validate_step_schedule(self)
        if self.tv not in ("official", "neighbour"):
            raise OptionError(f"tv must be 'official' or 'neighbour', got {self.tv!r}")
        if self.attribute_levels not in ("finer", "same"):
            raise OptionError(f"attribute_levels must be 'finer' or 'same', got {self.attribute_levels!r}")
        for name in ("max_refinement_steps", "first_refinement_steps"):
            check_count(getattr(self, name), name)
        self.validate_map_options()
        self.validate_update()

    def prepare(self, ctx: ControlContext) -> PreparedDivideBind:
        return PreparedDivideBind(self, ctx)


class PreparedDivideBind(PreparedControl):
    def __init__(self, cfg: DivideBind, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.groups = binding_groups(ctx, cfg.subjects, dict(cfg.bindings))
        nouns = [[noun for _, noun in groups] for groups in self.groups]
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects, positions=nouns), cfg, ctx)
        finer = [g for g in ctx.cross_resolutions if g[0] > self.resolution[0]]
        grids = finer if cfg.attribute_levels == "finer" and finer else [tuple(self.resolution)]
        self.attribute_keys = [MapKey("cross", g, cfg.blocks, cfg.normalise) for g in grids]
        self.attribute_weights = [len(ctx.select(k)) for k in self.attribute_keys]
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        self._min_tv: dict[int, float] = {}

    def map_keys(self) -> list[MapKey]:
        return [self.maps.key, *[k for k in self.attribute_keys if k != self.maps.key]]

    def refine_target(self, step: int) -> float | None:
        return self.cfg.thresholds.get(step) if self.updates_at(step) else None

    def wants_refinement(self, step: int, image: int, loss: float) -> bool:
        target = self.refine_target(step)
        return target is not None and self._min_tv.get(image, 0.0) < target

    def max_refinement(self, step: int) -> int:
        return self.cfg.first_refinement_steps if step == 0 else self.cfg.max_refinement_steps

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def _attribute_probs(self, maps, images: list[int]) -> torch.Tensor:
        """Token-softmaxed attribute maps at the subject grid: the finer levels nearest-resized, weighted by their
        number of layers (the official mean over all their maps, for equal head counts)."""
        rows, cols = self.resolution
        total = 0
        for key, weight in zip(self.attribute_keys, self.attribute_weights):
            m = maps[key].permute(0, 3, 1, 2)
            if tuple(m.shape[-2:]) != (rows, cols):
                m = F.interpolate(m, size=(rows, cols), mode="nearest")
            total = total + weight * m
        avg = (total / sum(self.attribute_weights)).permute(0, 2, 3, 1)
        return token_softmax(avg, self.maps.keep[images], self.cfg.softmax_scale)

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        cfg = self.cfg
        subjects = self.maps.per_image(maps, images)
        attr_probs = self._attribute_probs(maps, images)
        losses = []
        for row, (b, s) in enumerate(zip(images, subjects)):
            attrs = []
            for mods, _ in self.groups[b]:
                found = [attr_probs[row][..., list(w)].sum(-1) for w in mods]
                if cfg.smooth_attentions:
                    found = [gaussian_smooth(a, cfg.kernel_size, cfg.sigma) for a in found]
                attrs.append(found)
            loss, self._min_tv[b] = divide_bind_loss(s, attrs, step.index, cfg.tv)
            losses.append(loss)
        return torch.stack(losses)
