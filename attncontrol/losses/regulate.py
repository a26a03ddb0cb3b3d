"""Attention Regulation (Zhang et al., ECCV 2024, arXiv:2403.06381): the in-layer objective and the bias basis,
with the constants of the official code."""

from __future__ import annotations

from .._lazy import torch


def gaussian_bumps(rows: int, cols: int, device=None) -> torch.Tensor:
    """(C, rows, cols) Gaussian bumps with sigma = cols // 16 (at least 1), centred every 2 sigma from 2 sigma
    (49 bumps on 16x16, as the official code)."""
    sigma = max(1, cols // 16)
    ys = torch.arange(rows, dtype=torch.float32, device=device)
    xs = torch.arange(cols, dtype=torch.float32, device=device)
    bumps = [
        torch.exp(-((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma**2))
        for cy in range(2 * sigma, rows, 2 * sigma)
        for cx in range(2 * sigma, cols, 2 * sigma)
    ]
    if not bumps:  # maps smaller than 2 sigma: one bump in the middle
        bumps = [torch.exp(-((xs[None, :] - cols // 2) ** 2 + (ys[:, None] - rows // 2) ** 2) / (2 * sigma**2))]
    return torch.stack(bumps)


def regulation_objective(
    target_probs: torch.Tensor,
    weights: torch.Tensor,
    quantile: float = 0.9,
    quantile_target: float = 0.9,
    quantile_weight: float = 1.0,
    mean_weight: float = 80.0,
    weight_penalty: float = 0.09,
) -> torch.Tensor:
    """``quantile_weight * mean((q_0.9(A_k) - 0.9)^2) + mean_weight * mean((mean(A_k) - min(1, 0.2K)/K)^2)
    + weight_penalty * mean(w^2)``. ``target_probs``: (N, pixels, K) attention of the K targets."""
    k = target_probs.shape[-1]
    q = torch.quantile(target_probs, quantile, dim=1)
    mean_target = min(1.0, 0.2 * k) / k
    return (
        quantile_weight * ((q - quantile_target) ** 2).mean()
        + mean_weight * ((target_probs.mean(1) - mean_target) ** 2).mean()
        + weight_penalty * (weights**2).mean()
    )
