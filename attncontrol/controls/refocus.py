"""Attention Refocusing (Phung et al., CVPR 2024, arXiv:2306.05427): put each subject's attention inside its
box(es), on plain SD (the official code runs on GLIGEN). CAR (Eq. 2) with the official code's tiered weights,
SAR (Eq. 3), the official per-step schedule of loss scale and iterations (``plms.py:update_loss_self_cross``)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..errors import OptionError
from ..limits import MAX_ITERATIONS
from .base import ControlContext, PreparedControl, register
from .boxes import box_field_check, box_maps, parse_boxes
from .common import GuidanceOptions
from .fields import NON_NEGATIVE, Range, option
from .vocabulary import Evaluation, MapKey, Row, StepInfo, StepPlan

__all__ = ["CARWeights", "Refocus", "box_mask", "car_loss", "parse_boxes", "sar_loss"]

# -- the loss ----------------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


def box_cells(box: Box, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) grid slice of a normalised (x0, y0, x1, y1) box: floor of each edge, as the official
    code does (rows = y), widened to at least one cell so a small box still gets gradient."""
    x0, y0, x1, y1 = box
    c0, r0, c1, r1 = int(x0 * cols), int(y0 * rows), int(x1 * cols), int(y1 * rows)
    r0, c0 = min(r0, rows - 1), min(c0, cols - 1)
    return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


def box_mask(box: Box, rows: int, cols: int, device=None) -> torch.Tensor:
    r0, r1, c0, c1 = box_cells(box, rows, cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    mask[r0:r1, c0:c1] = True
    return mask


@dataclass(frozen=True)
class CARWeights:
    """The official code's tiers (``caculate_loss_att_fixed_cnt``)."""

    inside_low: float = 0.1  # below: weight 6
    inside_mid: float = 0.2  # below: weight 1; above: weight 1 only before ``late_step``
    outside_high: float = 0.15  # above: weight 4
    outside_mid: float = 0.1  # above: weight 1; below: weight 1 only before ``late_step``
    strong_inside: float = 6.0
    strong_outside: float = 4.0
    late_step: int = 15
    tiered: bool = True  # False: the paper's plain form, every term with weight 1


def car_loss(
    maps: torch.Tensor, boxes: list[list[Box]], step: int, weights: CARWeights = CARWeights()
) -> tuple[torch.Tensor, float]:
    """CAR for one image. ``maps``: (subjects, rows, cols), token-softmaxed and smoothed; ``boxes[k]``: subject
    k's boxes. Returns (loss, the smallest max-inside attention over all boxes).

    Per subject k: for each own box, reward its peak inside (``1 - max``); for each box of another subject,
    penalise k's peak there (with k's own boxes masked out); penalise k's peak outside every box, times the
    number of k's boxes / 2. Summed, divided by the number of subjects.
    """
    n, rows, cols = maps.shape
    masks = [[box_mask(b, rows, cols, maps.device) for b in subject] for subject in boxes]
    every = torch.zeros(rows, cols, dtype=torch.bool, device=maps.device)
    for subject in masks:
        for m in subject:
            every |= m
    total = maps.new_zeros(())
    min_inside = float("inf")
    w = weights
    late = step >= w.late_step
    for k in range(n):
        own = torch.zeros_like(every)
        for m in masks[k]:
            peak = maps[k][m].max()
            min_inside = min(min_inside, float(peak.detach()))
            if not w.tiered:
                total = total + (1 - peak)
            elif peak < w.inside_low:
                total = total + w.strong_inside * (1 - peak)
            elif peak < w.inside_mid or not late:
                total = total + (1 - peak)
            own |= m
        other_map = maps[k].masked_fill(own, 0.0)
        for j in range(n):
            if j == k:
                continue
            for m in masks[j]:
                peak = other_map[m].max()
                if not w.tiered:
                    total = total + peak
                elif peak > w.outside_high:
                    total = total + w.strong_outside * peak
                elif peak > w.outside_mid or not late:
                    total = total + peak
        background = maps[k].masked_fill(every, 0.0).max()
        total = total + len(masks[k]) * background / 2
    return total / n, min_inside


def sar_loss(self_attn: torch.Tensor, boxes: list[list[Box]]) -> torch.Tensor:
    """SAR for one image. ``self_attn``: (rows, cols, keys) with keys = the rows x cols pixels, row-major.
    For each box: the mean, over the query pixels inside it, of the attention mass on keys outside it.
    Summed over boxes, divided by the number of subjects."""
    rows, cols, keys = self_attn.shape
    if keys != rows * cols:
        raise ValueError(f"self-attention maps must have rows*cols={rows * cols} keys, got {keys}")
    flat = self_attn.reshape(rows * cols, keys)
    total = flat.new_zeros(())
    for subject in boxes:
        for b in subject:
            inside = box_mask(b, rows, cols, flat.device).flatten()
            total = total + flat[inside][:, ~inside].sum(-1).mean()
    return total / len(boxes)


# -- the options -------------------------------------------------------------------------------------------------

# The official SAR_CAR schedule (``update_loss_self_cross``): (steps below, loss scale, max iterations).
DEFAULT_SCHEDULE: tuple[tuple[int, float, int], ...] = ((2, 4.0, 2), (5, 4.0, 6), (10, 3.0, 3), (20, 3.0, 2))
DEFAULT_LATE = (1.0, 2)


def _schedule_entries(value, where: str):
    entries = [value] if where.endswith("late") else list(value)
    for entry in entries:
        below, (scale, iterations) = entry[:-2], entry[-2:]
        if any(b < 0 for b in below) or scale <= 0 or not 1 <= iterations <= MAX_ITERATIONS:
            raise OptionError(
                f"{where} entries need steps >= 0, a loss scale > 0 and 1 to {MAX_ITERATIONS} iterations, got {entry}"
            )
    return value


@register("refocus", order=3)
@dataclass
class Refocus(GuidanceOptions):
    """Attention Refocusing: boxes per subject, ``z <- z - grad(s_i * (CAR + SAR))``. The maps are A&E's recipe
    (the official code's); SAR reads self-attention at the same resolution."""

    boxes: dict = option(
        factory=dict,
        help="{'cat': (x0, y0, x1, y1), ...} normalised to [0, 1], x to the right, y down (rows = height); a subject "
        "may have several boxes (a list of tuples), as the official code allows. Keys are subjects as for "
        "attend-excite (words, phrases, cat#2).",
        check=box_field_check(one_per_subject=False, method="Refocus"),
        user_option=False,
    )
    cross_weight: float = option(1.0, "weight of CAR (official: 1).", range=NON_NEGATIVE)
    self_weight: float = option(1.0, "weight of SAR (official: 1).", range=NON_NEGATIVE)
    tiered: bool = option(True, "the official code's tiered CAR weights; False = the paper's plain form.")
    schedule: tuple[tuple[int, float, int], ...] = option(
        DEFAULT_SCHEDULE,
        "((steps below, loss scale, max iterations), ...); steps past the last entry use late but are only guided "
        "at late_steps. Official: <2: (4, 2), <5: (4, 6), <10: (3, 3), <20: (3, 2), else (1, 2). Iterations: 1 to "
        "1000.",
        check=_schedule_entries,
    )
    late: tuple[float, int] = option(
        DEFAULT_LATE,
        "(loss scale, max iterations) of the steps past the schedule (official: (1, 2)).",
        check=_schedule_entries,
    )
    early_steps: int = option(
        10,
        "steps 0 .. early_steps - 1 iterate while the scaled loss > loss_threshold and "
        "the weakest box peak < inside_threshold (official: 10).",
        low=0,
        unit="steps",
        app=(0, 1000),
    )
    late_steps: tuple[int, ...] = option(
        (10, 15, 20, 25, 30, 35),
        "later steps guided (while the weakest box peak < inside_threshold); official: every 5th step from 10 to 35.",
        items=Range(0),
        unit="steps",
    )
    loss_threshold: float = option(0.1, "see early_steps (official: 0.1).")
    inside_threshold: float = option(0.2, "see early_steps and late_steps (official: 0.2).")

    @property
    def subjects(self) -> list:
        return list(self.boxes)

    def prepare(self, ctx: ControlContext) -> PreparedRefocus:
        return PreparedRefocus(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


class PreparedRefocus(PreparedControl):
    """Its evaluation reports per image ``min_inside``, the weakest box peak, which its refinement test reads."""

    kinds = ("cross", "self")

    def __init__(self, cfg: Refocus, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.bind_maps(box_maps(cfg, ctx, "Refocus"), cfg, ctx)
        ctx.select(MapKey("self", self.resolution, cfg.block_tuple))  # the layers SAR reads exist
        self.boxes = list(cfg.boxes.values())

    def _scale_iters(self, step: int) -> tuple[float, int]:
        for below, scale, iters in self.cfg.schedule:
            if step < below:
                return float(scale), int(iters)
        return float(self.cfg.late[0]), int(self.cfg.late[1])

    def plan(self, step: int) -> StepPlan:
        cfg = self.cfg
        scale, iterations = self._scale_iters(step)
        update = self.in_window(step) and (step < cfg.early_steps or step in cfg.late_steps)

        def test(row: Row) -> bool:
            weak = row.stats.get("min_inside", 0.0) < cfg.inside_threshold
            if step < cfg.early_steps:
                return weak and scale * row.loss > cfg.loss_threshold
            return weak

        def final(row: Row, refined: bool) -> bool:
            # the official loop tests before every update but the first, on the evaluation that drove the previous
            # update: after refinement the step ends unless that test still passes
            return update and (not refined or test(row))

        # the official loop counts every update; the last one is the final update (when the test still passes)
        refine = test if update and iterations > 1 else None
        return self.make_plan(step, scale, update, refine, iterations - 1, final)

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        weights = CARWeights(tiered=self.cfg.tiered)
        self_maps = maps[MapKey("self", self.resolution, self.blocks)]
        losses, stats = [], []
        for row, m in enumerate(self.maps.per_image(maps, images)):
            car, min_inside = car_loss(m, self.boxes, step.index, weights)
            stats.append({"min_inside": min_inside})
            losses.append(self.cfg.cross_weight * car + self.cfg.self_weight * sar_loss(self_maps[row], self.boxes))
        return Evaluation(torch.stack(losses), stats=stats)
