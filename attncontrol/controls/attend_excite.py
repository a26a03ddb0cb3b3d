"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv:2301.13826): excite the most neglected subject's
attention. Its loss (Sec. 3, Eq. 1-2), its options and its step plan."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from .base import ControlContext, PreparedControl, register, subjects_field, window_stop
from .common import (
    GuidanceOptions,
    TokenMaps,
    ae_step_sizes,
    count_field,
    scale_factor_field,
    scale_range_field,
    subject_maps,
    thresholds_field,
)
from .vocabulary import Evaluation, StepInfo, StepPlan, loss_above

# -- the loss ----------------------------------------------------------------------------------------------------


def subject_max_attention(
    probs: torch.Tensor,
    subjects: list[tuple[int, ...]],
    kernel_size: int = 3,
    sigma: float = 0.5,
    smooth: bool = True,
) -> torch.Tensor:
    """Max over pixels of each subject's (smoothed) map: (num_subjects,)."""
    return subject_maps(probs, subjects, kernel_size, sigma, smooth).flatten(1).amax(1)


def attend_excite_loss(max_attention: torch.Tensor) -> torch.Tensor:
    """``L = max_s max(0, 1 - max_attention_s)``: only the most neglected subject gets gradient."""
    return torch.clamp(1.0 - max_attention, min=0.0).max()


# -- the options -------------------------------------------------------------------------------------------------


def _default_thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@register("attend-excite", order=1)
@dataclass
class AttendExcite(GuidanceOptions):
    """Attend-and-Excite with the parameters and defaults of diffusers' ``StableDiffusionAttendAndExcitePipeline``."""

    subjects: list = subjects_field()
    scale_factor: float = scale_factor_field()
    scale_range: tuple[float, float] = scale_range_field()
    thresholds: dict[int, float] = thresholds_field(
        _default_thresholds,
        "{step: T}; at those steps the latents are refined until every subject's max attention reaches T "
        "(loss <= 1 - T).",
    )
    max_refinement_steps: int = count_field(
        20, "at most this many refinement iterations per threshold step (diffusers: 20).", app=(0, 50)
    )
    stop: int | float | None = window_stop(25, "latents are updated at steps start .. stop - 1 (diffusers: 25).")

    def prepare(self, ctx: ControlContext) -> PreparedAttendExcite:
        return PreparedAttendExcite(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


class PreparedAttendExcite(PreparedControl):
    def __init__(self, cfg: AttendExcite, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects), cfg, ctx)
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)

    def plan(self, step: int) -> StepPlan:
        # no refinement before the window opens; at threshold steps from ``stop`` on it still refines (with no final
        # update), as diffusers' pipeline does past ``max_iter_to_alter``
        t = self.cfg.thresholds.get(step) if step >= self.first else None
        refine = None if t is None else loss_above(max(0.0, 1.0 - t))
        return self.make_plan(step, self.step_sizes[step], refine=refine, max_refinement=self.cfg.max_refinement_steps)

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        per_image = self.maps.per_image(maps, images)
        return Evaluation(torch.stack([attend_excite_loss(m.flatten(1).amax(1)) for m in per_image]))
