"""BoxDiff (Xie et al., ICCV 2023, arXiv:2307.10816): training-free box constraints on each subject's
cross-attention map (inner box, outer box, corners), A&E-style latent updates. Constants from the official code
(showlab/BoxDiff: ``pipeline/sd_pipeline_boxdiff.py``, ``config.py:RunConfig``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._lazy import torch
from .base import ControlContext, PreparedControl, register, window_stop
from .boxes import box_field_check, box_maps
from .common import (
    GuidanceOptions,
    ae_step_sizes,
    count_field,
    scale_factor_field,
    scale_range_field,
    thresholds_field,
)
from .fields import Range, option
from .vocabulary import Evaluation, Row, StepInfo, StepPlan

# -- the loss ----------------------------------------------------------------------------------------------------


def grid_box(box: tuple[float, float, float, float], rows: int, cols: int) -> tuple[int, int, int, int]:
    """A normalised (x0, y0, x1, y1) box on the map grid: each edge times the grid size, rounded half to even
    (Python's ``round``, as the official ``round(pixels / 32)`` of 512-pixel boxes), end-exclusive; widened to at
    least one cell (a box that rounds to nothing would make the official top-k empty and its latents NaN)."""
    x0, y0, x1, y1 = box
    c0, r0 = min(round(x0 * cols), cols - 1), min(round(y0 * rows), rows - 1)
    c1, r1 = max(round(x1 * cols), c0 + 1), max(round(y1 * rows), r0 + 1)
    return c0, r0, min(c1, cols), min(r1, rows)


def top_fraction_mean(values: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the ``floor(fraction * mask.sum())`` largest entries of ``values * mask`` (at least one)."""
    k = max(1, int(fraction * int(mask.sum())))
    return torch.topk((values * mask).flatten(), k).values.mean()


def corner_term(projection: torch.Tensor, target: torch.Tensor, lo: int, hi: int, window: int, size: int):
    """``(1/size) sum_j |projection_j - target_j|`` over the cells within ``window`` of the box edges lo and hi."""
    n = projection.shape[0]
    pick = torch.zeros(n, dtype=torch.bool, device=projection.device)
    for edge in (lo, hi):
        pick[max(edge - window, 0) : min(edge + window, n - 1) + 1] = True
    return ((projection - target).abs() * pick).sum() / size


def boxdiff_terms(x: torch.Tensor, box, top: float = 0.2, window: int = 1) -> dict[str, torch.Tensor]:
    """The three constraints of one subject's (rows, cols) map ``x`` and its normalised box."""
    rows, cols = x.shape
    c0, r0, c1, r1 = grid_box(box, rows, cols)
    mask = torch.zeros(rows, cols, dtype=x.dtype, device=x.device)
    mask[r0:r1, c0:c1] = 1
    inner = top_fraction_mean(x, mask, top)
    outer = top_fraction_mean(x, 1 - mask, top) if int((1 - mask).sum()) else x.new_zeros(())
    gx, gy = mask.amax(0), mask.amax(1)  # the box's projections on the x and y axes
    dx = corner_term(x.amax(0), gx, c0, c1, window, cols)
    dy = corner_term(x.amax(1), gy, r0, r1, window, rows)
    return {"inner": torch.relu(1 - inner), "outer": outer, "corner_x": dx, "corner_y": dy}


def boxdiff_loss(maps: torch.Tensor, boxes: list, top: float = 0.2, window: int = 1) -> tuple[torch.Tensor, float]:
    """Sum over subjects of inner + outer + corner terms (all weights 1); also the largest inner term (the official
    refinement's test). ``maps``: (subjects, rows, cols); ``boxes[k]``: subject k's normalised box."""
    total, worst = maps.new_zeros(()), 0.0
    for k, box in enumerate(boxes):
        terms = boxdiff_terms(maps[k], box, top, window)
        total = total + sum(terms.values())
        worst = max(worst, float(terms["inner"].detach()))
    return total, worst


# -- the options -------------------------------------------------------------------------------------------------


def _thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@register("boxdiff", order=8)
@dataclass
class BoxDiff(GuidanceOptions):
    """BoxDiff: ``L = sum_s [(1 - topk_in(S_s)) + topk_out(S_s) + corner_x + corner_y]``,
    ``z <- z - alpha_i grad L``."""

    boxes: dict = option(
        factory=dict,
        help="{'cat': (x0, y0, x1, y1), ...} normalised to [0, 1] (x to the right, y down), one box per subject; on "
        "the map grid each edge is rounded half to even, end-exclusive, as the official round(px / 32).",
        check=box_field_check(one_per_subject=True, method="BoxDiff"),
        user_option=False,
    )
    top: float = option(
        0.2,
        "the fraction P of a region's cells whose largest values are averaged, inside and "
        "outside the box (official: 0.2).",
        range=Range(0, 1, open_low=True),
        unit="fraction",
    )
    corner_window: int = option(
        1, "the corner term's half-window L around each box edge (official: 1).", low=0, unit="grid cells"
    )
    scale_factor: float = scale_factor_field()
    scale_range: tuple[float, float] = scale_range_field()
    thresholds: dict[int, float] = thresholds_field(
        _thresholds,
        "{step: T}: refine while some subject's inner top-P mean < T (official: {0: 0.05, 10: 0.5, 20: 0.8}); {} = "
        "the official refine=False.",
    )
    max_refinement_steps: int = count_field(20, "refinement cap per step (official: 20).", app=(0, 50))
    stop: int | float | None = window_stop(25, "updates at steps start .. stop - 1 (official: 25).")

    @property
    def subjects(self) -> list:
        return list(self.boxes)

    def prepare(self, ctx: ControlContext) -> PreparedBoxDiff:
        return PreparedBoxDiff(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


def _inner_short_of(target: float) -> Callable[[Row], bool]:
    """The official test: the worst subject's inner term ``1 - topk_in`` is above ``1 - T``."""

    def test(row: Row) -> bool:
        return row.stats.get("worst_inner", 1.0) > 1.0 - target

    return test


class PreparedBoxDiff(PreparedControl):
    """Its evaluation reports per image ``worst_inner``, the worst subject's ``1 - topk_in``."""

    def __init__(self, cfg: BoxDiff, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(box_maps(cfg, ctx, "BoxDiff"), cfg, ctx)
        self.boxes = list(cfg.boxes.values())
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)

    def plan(self, step: int) -> StepPlan:
        t = self.cfg.thresholds.get(step) if self.in_window(step) else None
        refine = None if t is None else _inner_short_of(t)
        return self.make_plan(step, self.step_sizes[step], refine=refine, max_refinement=self.cfg.max_refinement_steps)

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        cfg = self.cfg
        losses, stats = [], []
        for m in self.maps.per_image(maps, images):
            loss, worst = boxdiff_loss(m, self.boxes, cfg.top, cfg.corner_window)
            losses.append(loss)
            stats.append({"worst_inner": worst})
        return Evaluation(torch.stack(losses), stats=stats)
