"""BoxDiff (Xie et al., ICCV 2023): training-free box constraints on each subject's cross-attention map (inner box,
outer box, corners), A&E-style latent updates. Constants from the official code (showlab/BoxDiff:
``pipeline/sd_pipeline_boxdiff.py``, ``config.py:RunConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .._lazy import torch
from ..errors import OptionError, SubjectError
from ..limits import check_count
from ..losses.boxdiff import boxdiff_loss
from .base import ControlContext, PreparedControl, StepInfo, with_aliases
from .common import GuidanceOptions, TokenMaps, ae_step_sizes, validate_step_schedule
from .options import check_fields
from .refocus import _as_box_list


def _thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@with_aliases
@dataclass
class BoxDiff(GuidanceOptions):
    """BoxDiff: ``L = sum_s [(1 - topk_in(S_s)) + topk_out(S_s) + corner_x + corner_y]``, ``z <- z - alpha_i grad L``.

    Args:
        boxes: ``{"cat": (x0, y0, x1, y1), ...}`` normalised to [0, 1] (x to the right, y down), one box per subject;
            on the map grid each edge is rounded half to even, end-exclusive, as the official ``round(px / 32)``.
        top: the fraction P of a region's cells whose largest values are averaged, inside and outside the box
            (official: 0.2).
        corner_window: the corner term's half-window L around each box edge, in grid cells (official: 1).
        stop (alias ``max_iter_to_alter``): updates at steps ``start .. stop - 1`` (official: 25).
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, steps)[i])`` (20, (1, 0.5)).
        thresholds: ``{step: T}``: refine while some subject's inner top-P mean < T (official: {0: 0.05, 10: 0.5,
            20: 0.8}); ``{}`` = the official ``refine=False``.
        max_refinement_steps: refinement cap per step (official: 20; at most 1000).
        attn_res, kernel_size, sigma, smooth_attentions, exclude_eot, softmax_scale, blocks, normalise, recipe:
            the maps (:class:`~attncontrol.controls.common.MapOptions`).
        update, velocity_scale: how the latents move (:class:`~attncontrol.controls.common.GuidanceOptions`).
    """

    method: ClassVar[str] = "boxdiff"
    aliases: ClassVar[dict[str, str]] = {"max_iter_to_alter": "stop"}

    boxes: dict = field(default_factory=dict)
    top: float = 0.2
    corner_window: int = 1
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    thresholds: dict[int, float] = field(default_factory=_thresholds)
    max_refinement_steps: int = 20
    stop: int | float | None = field(default=25, kw_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.boxes, dict) or not self.boxes:
            raise OptionError(f"BoxDiff needs boxes as {{subject: (x0, y0, x1, y1)}}, got {self.boxes!r}")
        boxes = {}
        for subject, value in self.boxes.items():
            found = _as_box_list(subject, value)
            if len(found) != 1:
                raise OptionError(f"BoxDiff takes one box per subject; {subject!r} has {len(found)}: {found}")
            boxes[subject] = found[0]
        self.boxes = boxes
        self.validate_window()
        validate_step_schedule(self)
        if not 0.0 < self.top <= 1.0:
            raise OptionError(f"top must be a fraction in (0, 1], got {self.top}")
        if self.corner_window < 0:
            raise OptionError(f"corner_window must be >= 0 grid cells, got {self.corner_window}")
        check_count(self.max_refinement_steps, "max_refinement_steps")
        self.validate_map_options()
        self.validate_update()

    @property
    def subjects(self) -> list:
        return list(self.boxes)

    def prepare(self, ctx: ControlContext) -> PreparedBoxDiff:
        return PreparedBoxDiff(self, ctx)


class PreparedBoxDiff(PreparedControl):
    def __init__(self, cfg: BoxDiff, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        try:
            maps = TokenMaps(cfg, ctx, cfg.subjects)
        except SubjectError as err:
            raise SubjectError(f"BoxDiff boxes: {err}") from None
        self.bind_maps(maps, cfg, ctx)
        self.boxes = list(cfg.boxes.values())
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        self.max_refinement_steps = cfg.max_refinement_steps
        self._worst_inner: dict[int, float] = {}

    def refine_target(self, step: int) -> float | None:
        t = self.cfg.thresholds.get(step)
        return None if t is None or not self.updates_at(step) else t

    def wants_refinement(self, step: int, image: int, loss: float) -> bool:
        """The official test: the worst subject's inner term ``1 - topk_in`` is above ``1 - T``."""
        target = self.refine_target(step)
        return target is not None and self._worst_inner.get(image, 1.0) > 1.0 - target

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        cfg = self.cfg
        losses = []
        for b, m in zip(images, self.maps.per_image(maps, images)):
            loss, self._worst_inner[b] = boxdiff_loss(m, self.boxes, cfg.top, cfg.corner_window)
            losses.append(loss)
        return torch.stack(losses)
