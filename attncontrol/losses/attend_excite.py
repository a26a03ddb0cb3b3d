"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv:2301.13826), Sec. 3 / Eq. 1-2."""

from __future__ import annotations

from .._lazy import torch
from ..ops import gaussian_smooth


def subject_maps(
    probs: torch.Tensor,
    subjects: list[tuple[int, ...]],
    kernel_size: int = 3,
    sigma: float = 0.5,
    smooth: bool = True,
) -> torch.Tensor:
    """Each subject's (smoothed) map from token-softmaxed ``probs`` (rows, cols, tokens) of one image:
    (num_subjects, rows, cols). A subject of several tokens (a split word, a phrase) sums its tokens' maps."""
    maps = torch.stack([probs[..., list(pos)].sum(-1) for pos in subjects])
    return gaussian_smooth(maps, kernel_size, sigma) if smooth else maps


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
