"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): excite the most neglected subject's attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError
from ..limits import check_count
from ..losses.attend_excite import attend_excite_loss
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, validate_step_schedule
from .options import check_fields


def _default_thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@with_aliases
@dataclass
class AttendExcite(GuidanceOptions):
    """Attend-and-Excite with the parameters and defaults of diffusers' ``StableDiffusionAttendAndExcitePipeline``.

    Args:
        subjects: words, phrases (``"red car"``), occurrences (``"cat#2"``) or token indices; one list for
            every prompt, or one list per prompt.
        stop (alias ``max_iter_to_alter``): latents are updated at steps ``start .. stop - 1`` (default 25).
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, num_steps)[i])``.
        thresholds: ``{step: T}``; at those steps the latents are refined until every subject's max
            attention reaches ``T`` (loss <= 1 - T).
        max_refinement_steps: at most this many refinement iterations per threshold step (diffusers: 20; at most
            1000).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps (:class:`~attncontrol.controls.common.MapOptions`).
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    """

    method: ClassVar[str] = "attend-excite"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    subjects: list = field(default_factory=list)
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    thresholds: dict[int, float] = field(default_factory=_default_thresholds)
    max_refinement_steps: int = 20
    stop: int | float | None = field(default=25, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate_subjects()
        self.validate_window()
        validate_step_schedule(self)
        for step, value in self.thresholds.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise OptionError(f"thresholds keys must be step indices >= 0, got {step!r}")
            if not 0.0 <= value <= 1.0:
                raise OptionError(f"thresholds values must be between 0 and 1, got {value} at step {step}")
        check_count(self.max_refinement_steps, "max_refinement_steps")
        self.validate_map_options()
        self.validate_update()

    def prepare(self, ctx: ControlContext) -> PreparedAttendExcite:
        return PreparedAttendExcite(self, ctx)


class PreparedAttendExcite(PreparedControl):
    def __init__(self, cfg: AttendExcite, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects), cfg, ctx)
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        self.max_refinement_steps = cfg.max_refinement_steps

    def refine_target(self, step: int) -> float | None:
        # no refinement before the window opens; at threshold steps from ``stop`` on it still refines (with no final
        # update), as diffusers' pipeline does past ``max_iter_to_alter``
        if step < self.first:
            return None
        t = self.cfg.thresholds.get(step)
        return None if t is None else max(0.0, 1.0 - t)

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        per_image = self.maps.per_image(maps, images)
        return torch.stack([attend_excite_loss(m.flatten(1).amax(1)) for m in per_image])
