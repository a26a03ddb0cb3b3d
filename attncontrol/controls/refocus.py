"""Attention Refocusing (Phung et al., CVPR 2024): put each subject's attention inside its box(es), on plain
SD (the official code runs on GLIGEN). CAR with the official code's tiered weights, SAR, the official
per-step schedule of loss scale and iterations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError, SubjectError
from ..limits import MAX_ITERATIONS
from ..losses.refocus import CARWeights, car_loss, sar_loss
from ..store import MapKey
from .base import ControlContext, PreparedControl, StepInfo
from .common import GuidanceOptions, TokenMaps
from .options import check_fields

# The official SAR_CAR schedule (``update_loss_self_cross``): (steps below, loss scale, max iterations).
DEFAULT_SCHEDULE: tuple[tuple[int, float, int], ...] = ((2, 4.0, 2), (5, 4.0, 6), (10, 3.0, 3), (20, 3.0, 2))
DEFAULT_LATE = (1.0, 2)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_box_list(subject, value) -> list[tuple[float, float, float, float]]:
    """One box ``(x0, y0, x1, y1)`` or a list of them, each four numbers; an OptionError naming the box otherwise."""
    if not isinstance(value, (list, tuple)):
        raise OptionError(f"box for {subject!r} must be (x0, y0, x1, y1) or a list of such boxes, got {value!r}")
    boxes = [value] if any(_is_number(v) for v in value) else list(value)
    out = []
    for box in boxes:
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            shown = value if box is value else box
            raise OptionError(f"box for {subject!r} must be four numbers (x0, y0, x1, y1), got {shown!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise OptionError(f"box for {subject!r} must lie inside [0, 1] (normalised x0, y0, x1, y1), got {box!r}")
        if not (x0 < x1 and y0 < y1):
            raise OptionError(f"box for {subject!r} needs x0 < x1 and y0 < y1, got {box!r}")
        out.append((x0, y0, x1, y1))
    if not out:
        raise OptionError(f"no box given for {subject!r}")
    return out


def parse_boxes(text: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """``"cat=0.05,0.2,0.5,0.9;dog=0.55,0.2,0.95,0.9"`` -> ``{"cat": [(0.05, 0.2, 0.5, 0.9)], "dog": [...]}``.
    A subject named twice gets both boxes. Values are validated by :class:`Refocus`."""
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        subject, sep, values = part.partition("=")
        if not sep or not subject.strip():
            raise OptionError(f"a box must look like 'cat=x0,y0,x1,y1', got {part!r}")
        try:
            numbers = tuple(float(v) for v in values.replace(" ", ",").split(",") if v)
        except ValueError:
            raise OptionError(f"box {part!r}: coordinates must be numbers") from None
        if len(numbers) != 4:
            raise OptionError(f"box {part!r}: expected 4 numbers x0,y0,x1,y1, got {len(numbers)}")
        boxes.setdefault(subject.strip(), []).append(numbers)
    if not boxes:
        raise OptionError(f"no boxes in {text!r}; expected 'cat=x0,y0,x1,y1;dog=...'")
    return boxes


@dataclass
class Refocus(GuidanceOptions):
    """Attention Refocusing: boxes per subject, ``z <- z - grad(s_i * (CAR + SAR))``.

    Args:
        boxes: ``{"cat": (x0, y0, x1, y1), ...}`` normalised to [0, 1], x to the right, y down (rows = height);
            a subject may have several boxes (a list of tuples), as the official code allows. Keys are
            subjects as for :class:`AttendExcite` (words, phrases, ``cat#2``).
        cross_weight, self_weight: weights of CAR and SAR (official: 1 and 1).
        tiered: the official code's tiered CAR weights (default); False = the paper's plain form.
        schedule: ``((steps below, loss scale, max iterations), ...)``; steps past the last entry use
            ``late`` but are only guided at ``late_steps``. Official: <2: (4, 2), <5: (4, 6), <10: (3, 3),
            <20: (3, 2), else (1, 2). Iterations: 1 to 1000.
        late: (loss scale, max iterations) of the steps past the schedule (official: (1, 2)).
        early_steps, loss_threshold, inside_threshold: steps ``0 .. early_steps - 1`` iterate while the scaled
            loss > ``loss_threshold`` and the weakest box peak < ``inside_threshold`` (official: 10, 0.1, 0.2).
        late_steps: later steps guided (while the weakest box peak < ``inside_threshold``); official: every 5th
            step from 10 to 35.
        start, stop: the window of steps inside which the schedule above applies (default: all steps).
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the cross-attention maps as for :class:`AttendExcite` (the official code uses A&E's recipe); SAR uses
            self-attention at the same resolution.
    """

    method: ClassVar[str] = "refocus"

    boxes: dict = field(default_factory=dict)
    cross_weight: float = 1.0
    self_weight: float = 1.0
    tiered: bool = True
    schedule: tuple[tuple[int, float, int], ...] = DEFAULT_SCHEDULE
    late: tuple[float, int] = DEFAULT_LATE
    early_steps: int = 10
    late_steps: tuple[int, ...] = (10, 15, 20, 25, 30, 35)
    loss_threshold: float = 0.1
    inside_threshold: float = 0.2

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.boxes, dict) or not self.boxes:
            raise OptionError(f"Refocus needs boxes as {{subject: (x0, y0, x1, y1)}}, got {self.boxes!r}")
        self.boxes = {subject: _as_box_list(subject, value) for subject, value in self.boxes.items()}
        self.validate_window()
        for name in ("cross_weight", "self_weight"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, entry in (*(("schedule", e) for e in self.schedule), ("late", self.late)):
            below, (scale, iterations) = entry[:-2], entry[-2:]
            if any(b < 0 for b in below) or scale <= 0 or not 1 <= iterations <= MAX_ITERATIONS:
                raise OptionError(f"{name} entries need steps >= 0, a loss scale > 0 and 1 to {MAX_ITERATIONS} "
                                  f"iterations, got {entry}")  # fmt: skip
        self.validate_map_options()
        self.validate_update()

    @property
    def subjects(self) -> list:
        return list(self.boxes)

    def prepare(self, ctx: ControlContext) -> PreparedRefocus:
        return PreparedRefocus(self, ctx)


class PreparedRefocus(PreparedControl):
    kinds = ("cross", "self")

    def __init__(self, cfg: Refocus, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        try:
            maps = TokenMaps(cfg, ctx, cfg.subjects)
        except SubjectError as err:
            raise SubjectError(f"Refocus boxes: {err}") from None
        self.bind_maps(maps, cfg, ctx)
        ctx.select(MapKey("self", self.resolution, cfg.blocks))  # the layers SAR reads exist
        self.boxes = list(cfg.boxes.values())
        self._min_inside: dict[int, float] = {}

    def _scale_iters(self, step: int) -> tuple[float, int]:
        for below, scale, iters in self.cfg.schedule:
            if step < below:
                return float(scale), int(iters)
        return float(self.cfg.late[0]), int(self.cfg.late[1])

    def updates_at(self, step: int) -> bool:
        return self.in_window(step) and (step < self.cfg.early_steps or step in self.cfg.late_steps)

    def refines_at(self, step: int) -> bool:
        return self.updates_at(step) and self._scale_iters(step)[1] > 1

    def wants_refinement(self, step: int, image: int, loss: float) -> bool:
        weak = self._min_inside.get(image, 0.0) < self.cfg.inside_threshold
        if step < self.cfg.early_steps:
            return weak and self.step_size(step) * loss > self.cfg.loss_threshold
        return weak

    def max_refinement(self, step: int) -> int:
        # the official loop counts every update; the last one is the final update (when the test still passes)
        return self._scale_iters(step)[1] - 1

    def final_update(self, step: int, image: int, refined: bool, loss: float) -> bool:
        """The official loop (``plms.py:update_loss_self_cross``) tests before every update but the first, on the
        evaluation that drove the previous update: after refinement the step ends unless that test still passes."""
        if not self.updates_at(step):
            return False
        return not refined or self.wants_refinement(step, image, loss)

    def step_size(self, step: int) -> float:
        return self._scale_iters(step)[0]

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        weights = CARWeights(tiered=self.cfg.tiered)
        self_maps = maps[MapKey("self", self.resolution, self.blocks)]
        losses = []
        for row, (b, m) in enumerate(zip(images, self.maps.per_image(maps, images))):
            car, min_inside = car_loss(m, self.boxes, step.index, weights)
            self._min_inside[b] = min_inside
            losses.append(self.cfg.cross_weight * car + self.cfg.self_weight * sar_loss(self_maps[row], self.boxes))
        return torch.stack(losses)
