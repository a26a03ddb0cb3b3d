"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv:2301.13826), Sec. 3 / Eq. 1-2."""

from __future__ import annotations

import torch

from ..ops import gaussian_smooth


def subject_max_attention(
    probs: torch.Tensor,
    subjects: list[tuple[int, ...]],
    kernel_size: int = 3,
    sigma: float = 0.5,
    smooth: bool = True,
) -> torch.Tensor:
    """Max over pixels of each subject's (smoothed) token-softmaxed map.

    ``probs``: (rows, cols, tokens) of one image, already softmaxed over the kept tokens. A subject of
    several tokens (a split word, a phrase) uses the sum of its tokens' maps. Returns (num_subjects,).
    """
    maps = torch.stack([probs[..., list(pos)].sum(-1) for pos in subjects])  # (S, rows, cols)
    if smooth:
        maps = gaussian_smooth(maps, kernel_size, sigma)
    return maps.flatten(1).amax(1)


def attend_excite_loss(max_attention: torch.Tensor) -> torch.Tensor:
    """``L = max_s max(0, 1 - max_attention_s)``: only the most neglected subject gets gradient."""
    return torch.clamp(1.0 - max_attention, min=0.0).max()
