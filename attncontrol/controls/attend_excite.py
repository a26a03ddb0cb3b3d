"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): excite the most neglected subject's attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ResolutionError
from ..losses.attend_excite import attend_excite_loss, subject_max_attention
from ..ops import token_softmax
from .base import Control, ControlContext, PreparedControl, StepInfo


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
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        if len(self.scale_range) != 2 or not all(s > 0 for s in self.scale_range):
            raise ValueError(f"scale_range must be two values > 0, got {self.scale_range}")
        for step, value in self.thresholds.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"thresholds keys must be step indices >= 0, got {step!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"thresholds values must be between 0 and 1, got {value} at step {step}")
        if self.max_refinement_steps < 0:
            raise ValueError(f"max_refinement_steps must be >= 0, got {self.max_refinement_steps}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not self.softmax_scale > 0:
            raise ValueError(f"softmax_scale must be > 0, got {self.softmax_scale}")
        if isinstance(self.attn_res, int):
            self.attn_res = (self.attn_res, self.attn_res)
        if self.attn_res is not None:
            self.attn_res = tuple(int(x) for x in self.attn_res)
            if len(self.attn_res) != 2 or min(self.attn_res) < 1:
                raise ValueError(f"attn_res must be (rows, cols) of positive ints, got {self.attn_res}")

    def prepare(self, ctx: ControlContext) -> PreparedAttendExcite:
        return PreparedAttendExcite(self, ctx)


class PreparedAttendExcite(PreparedControl):
    name = "attend_excite"

    def __init__(self, cfg: AttendExcite, ctx: ControlContext):
        self.cfg = cfg
        self.resolution = resolve_attn_res(cfg.attn_res, ctx)
        self.subjects = ctx.subjects_per_image(cfg.subjects)
        exclude = ctx.exclude_eot_default if cfg.exclude_eot is None else cfg.exclude_eot
        self.keep = ctx.keep_mask(exclude).to(ctx.device)
        scale = np.linspace(cfg.scale_range[0], cfg.scale_range[1], ctx.num_steps)
        self.step_sizes = cfg.scale_factor * np.sqrt(scale)
        self.max_refinement_steps = cfg.max_refinement_steps

    def updates_at(self, step: int) -> bool:
        return step < self.cfg.max_iter_to_alter

    def refine_target(self, step: int) -> float | None:
        t = self.cfg.thresholds.get(step)
        return None if t is None else max(0.0, 1.0 - t)

    def step_size(self, step: int) -> float:
        return float(self.step_sizes[step])

    def loss(self, maps, images: list[int], step: StepInfo) -> torch.Tensor:
        cross = maps[("cross", self.resolution)]
        probs = token_softmax(cross, self.keep[images], self.cfg.softmax_scale)
        losses = []
        for row, b in enumerate(images):
            peak = subject_max_attention(
                probs[row], self.subjects[b], self.cfg.kernel_size, self.cfg.sigma, self.cfg.smooth_attentions
            )
            losses.append(attend_excite_loss(peak))
        return torch.stack(losses)


def resolve_attn_res(attn_res, ctx: ControlContext) -> tuple[int, int]:
    if attn_res is None:
        return ctx.default_resolution
    if tuple(attn_res) not in ctx.cross_resolutions:
        have = ", ".join(f"{r}x{c}" for r, c in ctx.cross_resolutions)
        raise ResolutionError(
            f"attn_res {attn_res[0]}x{attn_res[1]} has no cross-attention layer at this image size "
            f"(latents {ctx.latent_hw[0]}x{ctx.latent_hw[1]}); this model has: {have}"
        )
    return tuple(attn_res)
