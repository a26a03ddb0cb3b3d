"""A-STAR (Agarwal et al., ICCV 2023, arXiv:2306.14544): keep subjects' attention apart (segregation, Eq. 2) and
keep each subject's attention where it was at the previous step (retention, Eq. 3). The paper publishes no code;
every constant that the paper does not state is ours and marked so below."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from .base import ControlContext, PreparedControl, register, subjects_field, window_stop
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, scale_factor_field, scale_range_field
from .fields import NON_NEGATIVE, Range, option
from .vocabulary import Evaluation, StepInfo, StepPlan

# -- the loss ----------------------------------------------------------------------------------------------------


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum min(a, b) / sum (a + b)`` over the last two dims (the paper's overlap measure)."""
    return torch.minimum(a, b).sum((-2, -1)) / (a + b).sum((-2, -1)).clamp_min(1e-12)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """Eq. 2: sum over subject pairs m > n of their overlap. ``maps``: (subjects, rows, cols)."""
    total = maps.new_zeros(())
    for m in range(maps.shape[0]):
        for n in range(m):
            total = total + soft_iou(maps[m], maps[n])
    return total


def retention_loss(maps: torch.Tensor, previous_masks: torch.Tensor) -> torch.Tensor:
    """Eq. 3: sum over subjects of ``1 - overlap(A_m, B_m)`` with B_m the previous step's binary mask."""
    return (1.0 - soft_iou(maps, previous_masks.to(maps.dtype))).sum()


def binarize(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """High-activation regions: pixels at or above ``threshold`` times each map's maximum (not stated in the
    paper; our default)."""
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps >= threshold * peak


# -- the options -------------------------------------------------------------------------------------------------


@register("astar", order=2)
@dataclass
class AStar(GuidanceOptions):
    """A-STAR: ``L = L_seg + L_ret`` (Eq. 4, unweighted), ``z <- z - alpha_i * grad L``. No refinement: the paper
    describes none."""

    subjects: list = subjects_field("as for attend-excite (at least two for segregation to act).")
    segregation_weight: float = option(1.0, "weight of L_seg (Eq. 4 has no weights: 1).", range=NON_NEGATIVE)
    retention_weight: float = option(1.0, "weight of L_ret (Eq. 4 has no weights: 1).", range=NON_NEGATIVE)
    mask_threshold: float = option(
        0.5,
        "a pixel is in subject m's high-activation region B_m when its attention is at least this fraction of the "
        "map's maximum. Not stated in the paper; our default 0.5.",
        range=Range(0, 1, open_low=True, open_high=True),
    )
    scale_factor: float = scale_factor_field(
        "the step size's factor, alpha_i = scale_factor * sqrt(linspace(*scale_range, steps)[i]). Not stated in "
        "the paper: A&E's schedule (the paper builds on A&E's setup)."
    )
    scale_range: tuple[float, float] = scale_range_field()
    stop: int | float | None = window_stop(
        None,
        "latents are updated at steps start .. stop - 1; None = every step (the paper updates at every step and "
        "shows that stopping early loses concepts).",
    )

    def prepare(self, ctx: ControlContext) -> PreparedAStar:
        return PreparedAStar(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


class PreparedAStar(PreparedControl):
    """Carries per image ``(step, mask)``: the masks of the latest step it evaluated and of the step before it
    (the "previous step" B_t of the retention loss)."""

    def __init__(self, cfg: AStar, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects), cfg, ctx)
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)

    def plan(self, step: int) -> StepPlan:
        return self.make_plan(step, self.step_sizes[step])

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        losses, carried = [], []
        for m, state in zip(self.maps.per_image(maps, images), carry):
            latest, previous = state if state is not None else (None, None)
            if latest is not None and latest[0] < step.index:
                previous = latest[1]
            loss = self.cfg.segregation_weight * segregation_loss(m)
            if previous is not None:  # no previous step at the first guided step
                loss = loss + self.cfg.retention_weight * retention_loss(m, previous)
            losses.append(loss)
            carried.append(((step.index, binarize(m.detach(), self.cfg.mask_threshold)), previous))
        return Evaluation(torch.stack(losses), carry=carried)
