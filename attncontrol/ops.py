"""Small tensor helpers shared by the losses (each defined once)."""

from __future__ import annotations

import math
from functools import lru_cache

from ._lazy import F, torch
from .errors import OptionError


@lru_cache(maxsize=16)
def _gaussian_kernel_cpu(kernel_size: int, sigma: float, formula: str = "attend-excite") -> torch.Tensor:
    if formula == "gaussian":
        # torchvision's gaussian_blur kernel (FOCUS's): exp(-(x - mean)^2 / (2 sigma^2)), in float64
        coords = torch.arange(kernel_size, dtype=torch.float64)
        axis = torch.exp(-0.5 * ((coords - (kernel_size - 1) / 2) / sigma) ** 2)
        kernel = axis[:, None] * axis[None, :]
        return kernel / kernel.sum()
    # Attend-and-Excite's kernel: exp(-((x - mean) / (2 * sigma)) ** 2) per axis, outer product, normalised.
    # (Its effective standard deviation is sigma * sqrt(2); kept as the reference has it, in float32.)
    coords = torch.arange(kernel_size, dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    axis = torch.exp(-(((coords - mean) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = axis[:, None] * axis[None, :]
    return kernel / kernel.sum()


def gaussian_kernel(
    kernel_size: int = 3, sigma: float = 0.5, device=None, dtype=None, formula: str = "attend-excite"
) -> torch.Tensor:
    """The (kernel_size, kernel_size) smoothing kernel of Attend-and-Excite (or a plain Gaussian's)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise OptionError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if sigma <= 0:
        raise OptionError(f"sigma must be > 0, got {sigma}")
    return _gaussian_kernel_cpu(int(kernel_size), float(sigma), formula).to(device=device, dtype=dtype or torch.float32)


def gaussian_smooth(
    maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5, formula: str = "attend-excite"
) -> torch.Tensor:
    """Smooth (..., rows, cols) maps: reflect-pad by ``kernel_size // 2``, then the Gaussian kernel."""
    if kernel_size == 1:
        return maps
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1])
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    weight = gaussian_kernel(kernel_size, sigma, device=maps.device, dtype=maps.dtype, formula=formula)[None, None]
    return F.conv2d(x, weight).reshape(shape)


def token_softmax(maps: torch.Tensor, keep: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Softmax over the kept tokens of (batch, rows, cols, tokens) maps after multiplying by ``scale``.

    ``keep`` is a (batch, tokens) bool mask; dropped tokens get probability 0 (as if sliced away).
    """
    logits = (maps * scale).masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)
