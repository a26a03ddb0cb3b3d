"""InitNO (Guo et al., CVPR 2024, arXiv:2404.04650): scores of the initial noise from the first step's attention,
as the official code computes them (xiefan-guo/initno, ``initno/pipelines/pipeline_sd_initno.py:fn_compute_loss``,
``fn_calc_kld_loss_func``, ``utils/attn_utils.py``)."""

from __future__ import annotations

from .._lazy import torch
from ..ops import gaussian_smooth


def cross_response(maps: torch.Tensor) -> torch.Tensor:
    """``max_s (1 - max_pixels C_s)``, clamped at 0: the weakest subject's peak (A&E's loss)."""
    return torch.clamp(1.0 - maps.flatten(1).amax(1), min=0.0).max()


def peak_self_maps(
    maps: torch.Tensor, self_attn: torch.Tensor, smooth: bool = True, kernel_size: int = 3, sigma: float = 0.5
) -> torch.Tensor:
    """For each subject of ``maps`` (subjects, rows, cols), the self-attention of its peak pixel over the key
    pixels (rows, cols), smoothed; ``self_attn``: (rows, cols, rows * cols), row-major keys."""
    rows, cols = maps.shape[1:]
    peaks = maps.detach().flatten(1).argmax(1).tolist()
    out = torch.stack([self_attn.reshape(rows * cols, rows, cols)[p] for p in peaks])
    return gaussian_smooth(out, kernel_size, sigma) if smooth else out


def self_conflict(self_maps: torch.Tensor) -> torch.Tensor:
    """Mean over subject pairs of ``sum min(S_a, S_b) / (sum (S_a + S_b) + 1e-6)``; 0 with fewer than two."""
    n = self_maps.shape[0]
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    if not pairs:
        return self_maps.new_zeros(())
    overlaps = [torch.minimum(self_maps[a], self_maps[b]).sum() / ((self_maps[a] + self_maps[b]).sum() + 1e-6)
                for a, b in pairs]  # fmt: skip
    return torch.stack(overlaps).mean()


def otsu_level(values: list[int]) -> int:
    """OpenCV's Otsu threshold of integer levels: the level t maximising q1 q2 (mu1 - mu2)^2 with class 1 = levels
    <= t, the first on ties, skipping splits where a class is empty."""
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    levels = sorted(counts)
    total, mean = len(values), sum(values) / len(values)
    best, best_t, q1, s1 = -1.0, levels[0], 0, 0.0
    for t in levels:
        q1 += counts[t]
        s1 += t * counts[t]
        q2 = total - q1
        if q1 == 0 or q2 == 0:
            continue
        mu1, mu2 = s1 / q1, (mean * total - s1) / q2
        var = (q1 / total) * (q2 / total) * (mu1 - mu2) ** 2
        if var > best:
            best, best_t = var, t
    return best_t


def clean_term(m: torch.Tensor) -> torch.Tensor:
    """The official code's second-blob penalty: Otsu-threshold the map (levels ``trunc(255 m)``, foreground =
    levels >= the threshold), take the 4-connected component of the peak; if the largest value outside it exceeds
    the smallest inside it, that largest outside value, else 0."""
    rows, cols = m.shape
    levels = (m.detach() * 255).to(torch.int64).flatten().tolist()
    t = otsu_level(levels)
    fg = [[levels[r * cols + c] >= t for c in range(cols)] for r in range(rows)]
    start = int(m.detach().flatten().argmax())
    seen, stack = set(), [(start // cols, start % cols)]
    while stack:
        r, c = stack.pop()
        if (r, c) in seen or not (0 <= r < rows and 0 <= c < cols) or not fg[r][c]:
            continue
        seen.add((r, c))
        stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    inside = torch.zeros(rows, cols, dtype=m.dtype, device=m.device)
    for r, c in seen:
        inside[r, c] = 1
    fg_vals = m * inside + (1 - inside)
    bg_vals = m * (1 - inside)
    if float(bg_vals.max().detach()) > float(fg_vals.min().detach()):
        return bg_vals.max()
    return m.new_zeros(())


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)) per element, averaged: ``mean(0.5 (e^lv + mu^2 - 1 - lv))``."""
    return (0.5 * (log_var.exp() + mean**2 - 1 - log_var)).mean()
