"""Pieces shared by the controls that work on per-subject cross-attention maps (A&E, A-STAR, Refocus)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ResolutionError
from ..losses.attend_excite import subject_maps
from ..ops import token_softmax
from .base import ControlContext


def validate_map_options(cfg) -> None:
    """Checks the smoothing/softmax/resolution fields every map-based control has; normalises ``attn_res``."""
    if cfg.kernel_size < 1 or cfg.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {cfg.kernel_size}")
    if not cfg.sigma > 0:
        raise ValueError(f"sigma must be > 0, got {cfg.sigma}")
    if not cfg.softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {cfg.softmax_scale}")
    if isinstance(cfg.attn_res, int):
        cfg.attn_res = (cfg.attn_res, cfg.attn_res)
    if cfg.attn_res is not None:
        cfg.attn_res = tuple(int(x) for x in cfg.attn_res)
        if len(cfg.attn_res) != 2 or min(cfg.attn_res) < 1:
            raise ValueError(f"attn_res must be (rows, cols) of positive ints, got {cfg.attn_res}")


def validate_step_schedule(cfg) -> None:
    if not cfg.scale_factor > 0:
        raise ValueError(f"scale_factor must be > 0, got {cfg.scale_factor}")
    if len(cfg.scale_range) != 2 or not all(s > 0 for s in cfg.scale_range):
        raise ValueError(f"scale_range must be two values > 0, got {cfg.scale_range}")


def ae_step_sizes(cfg, num_steps: int) -> np.ndarray:
    """A&E's step sizes: ``scale_factor * sqrt(linspace(scale_range[0], scale_range[1], num_steps))``."""
    return cfg.scale_factor * np.sqrt(np.linspace(cfg.scale_range[0], cfg.scale_range[1], num_steps))


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


class TokenMaps:
    """Per-image subject maps: cross-attention at ``resolution``, x softmax_scale, softmax over the kept
    tokens, each subject's tokens summed, Gaussian-smoothed (the A&E recipe that the other methods share)."""

    def __init__(self, cfg, ctx: ControlContext, subjects):
        self.cfg = cfg
        self.resolution = resolve_attn_res(cfg.attn_res, ctx)
        self.subjects = ctx.subjects_per_image(subjects)
        exclude = ctx.exclude_eot_default if cfg.exclude_eot is None else cfg.exclude_eot
        self.keep = ctx.keep_mask(exclude).to(ctx.device)

    def per_image(self, maps, images: list[int]) -> list[torch.Tensor]:
        probs = token_softmax(maps[("cross", self.resolution)], self.keep[images], self.cfg.softmax_scale)
        cfg = self.cfg
        return [
            subject_maps(probs[row], self.subjects[b], cfg.kernel_size, cfg.sigma, cfg.smooth_attentions)
            for row, b in enumerate(images)
        ]
