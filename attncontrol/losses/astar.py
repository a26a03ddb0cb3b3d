"""A-STAR (Agarwal et al., ICCV 2023, arXiv:2306.14544): attention segregation (Eq. 2) and retention (Eq. 3)."""

from __future__ import annotations

from .._lazy import torch


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
