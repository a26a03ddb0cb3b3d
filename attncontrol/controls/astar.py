"""A-STAR (Agarwal et al., ICCV 2023): keep subjects' attention apart (segregation) and keep each subject's
attention where it was at the previous step (retention). The paper publishes no code; every constant that
the paper does not state is ours and marked so below."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError
from ..losses.astar import binarize, retention_loss, segregation_loss
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, validate_step_schedule
from .options import check_fields


@with_aliases
@dataclass
class AStar(GuidanceOptions):
    """A-STAR: ``L = L_seg + L_ret`` (Eq. 4, unweighted), ``z <- z - alpha_i * grad L``.

    Args:
        subjects: as for :class:`AttendExcite` (at least two for segregation to act).
        stop (alias ``max_iter_to_alter``): latents are updated at steps ``start .. stop - 1``; None = every step
            (the paper updates at every step and shows that stopping early loses concepts).
        segregation_weight, retention_weight: weights of L_seg and L_ret: 1 and 1 (Eq. 4 has no weights).
        mask_threshold: a pixel is in subject m's high-activation region B_m when its attention is at least
            this fraction of the map's maximum. Not stated in the paper; our default 0.5.
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, steps)[i])``. Not
            stated in the paper; A&E's schedule (the paper builds on A&E's setup).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps, exactly as :class:`AttendExcite` builds them (the paper's "A_t" are A&E-style 16x16 maps).
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    No refinement: the paper describes none.
    """

    method: ClassVar[str] = "astar"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    subjects: list = field(default_factory=list)
    segregation_weight: float = 1.0
    retention_weight: float = 1.0
    mask_threshold: float = 0.5
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        for name in ("segregation_weight", "retention_weight"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise OptionError(f"mask_threshold must be between 0 and 1, got {self.mask_threshold}")
        validate_step_schedule(self)
        self.validate_map_options()
        self.validate_update()

    def prepare(self, ctx: ControlContext) -> PreparedAStar:
        return PreparedAStar(self, ctx)


class PreparedAStar(PreparedControl):
    def __init__(self, cfg: AStar, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects), cfg, ctx)
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        # per image: masks of the latest step seen, and of the step before it (the "previous step" B_t)
        self._latest: dict[int, tuple[int, torch.Tensor]] = {}
        self._previous: dict[int, torch.Tensor] = {}

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        losses = []
        for b, m in zip(images, self.maps.per_image(maps, images)):
            latest = self._latest.get(b)
            if latest is not None and latest[0] < step.index:
                self._previous[b] = latest[1]
            loss = self.cfg.segregation_weight * segregation_loss(m)
            if b in self._previous:  # no previous step at the first guided step
                loss = loss + self.cfg.retention_weight * retention_loss(m, self._previous[b])
            losses.append(loss)
            self._latest[b] = (step.index, binarize(m.detach(), self.cfg.mask_threshold))
        return torch.stack(losses)
