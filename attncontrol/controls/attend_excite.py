"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): excite the most neglected subject's attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses.attend_excite import attend_excite_loss
from .base import Control, ControlContext, PreparedControl, StepInfo
from .common import TokenMaps, ae_step_sizes, validate_map_options, validate_step_schedule


def _default_thresholds() -> dict[int, float]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@dataclass
class AttendExcite(Control):
    """Attend-and-Excite with the parameters and defaults of diffusers' ``StableDiffusionAttendAndExcitePipeline``.

    Args:
        subjects: words, phrases (``"red car"``), occurrences (``"cat#2"``) or token indices; one list for
            every prompt, or one list per prompt.
        max_iter_to_alter: latents are updated at steps ``0 .. max_iter_to_alter - 1``.
        scale_factor, scale_range: step size ``scale_factor * sqrt(linspace(*scale_range, num_steps)[i])``.
        thresholds: ``{step: T}``; at those steps the latents are refined until every subject's max
            attention reaches ``T`` (loss <= 1 - T), at most ``max_refinement_steps`` times.
        attn_res: (rows, cols) of the attention maps; ``None`` = the level 4x below the latents (16x16 at
            512 px for SD 1.x/2.x), or the nearest level with cross-attention.
        kernel_size, sigma, smooth_attentions: the 3x3 Gaussian smoothing of the reference.
        exclude_eot: drop end-of-text and padding from the softmax over tokens (the official SD 2.1
            behaviour). ``None`` = True for SD 2.x-style tokenizers (padding with "!"), False otherwise
            (diffusers' behaviour).
        softmax_scale: the maps are multiplied by this before the softmax over tokens (reference: 100).
    """

    subjects: list = field(default_factory=list)
    max_iter_to_alter: int = 25
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    thresholds: dict[int, float] = field(default_factory=_default_thresholds)
    max_refinement_steps: int = 20
    attn_res: tuple[int, int] | int | None = None
    kernel_size: int = 3
    sigma: float = 0.5
    smooth_attentions: bool = True
    exclude_eot: bool | None = None
    softmax_scale: float = 100.0

    def __post_init__(self) -> None:
        if isinstance(self.subjects, (str, int)):
            self.subjects = [self.subjects]
        self.subjects = list(self.subjects)
        if not self.subjects:
            raise ValueError("AttendExcite needs at least one subject, got an empty list")
        if self.max_iter_to_alter < 0:
            raise ValueError(f"max_iter_to_alter must be >= 0, got {self.max_iter_to_alter}")
        validate_step_schedule(self)
        for step, value in self.thresholds.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"thresholds keys must be step indices >= 0, got {step!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds values must be between 0 and 1, got {value} at step {step}")
        if self.max_refinement_steps < 0:
            raise ValueError(f"max_refinement_steps must be >= 0, got {self.max_refinement_steps}")
        validate_map_options(self)

    def prepare(self, ctx: ControlContext) -> PreparedAttendExcite:
        return PreparedAttendExcite(self, ctx)


class PreparedAttendExcite(PreparedControl):
    name = "attend_excite"

    def __init__(self, cfg: AttendExcite, ctx: ControlContext):
        self.cfg = cfg
        self.maps = TokenMaps(cfg, ctx, cfg.subjects)
        self.resolution = self.maps.resolution
        self.step_sizes = ae_step_sizes(cfg, ctx.num_steps)
        self.max_refinement_steps = cfg.max_refinement_steps

    def updates_at(self, step: int) -> bool:
        return step < self.cfg.max_iter_to_alter

    def refine_target(self, step: int) -> float | None:
        t = self.cfg.thresholds.get(step)
        return None if t is None else max(0.0, 1.0 - t)

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        per_image = self.maps.per_image(maps, images)
        return torch.stack([attend_excite_loss(m.flatten(1).amax(1)) for m in per_image])
