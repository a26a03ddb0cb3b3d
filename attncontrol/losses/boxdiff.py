"""BoxDiff (Xie et al., ICCV 2023, arXiv:2307.10816): inner-box, outer-box and corner constraints on each subject's
attention map, as the official code computes them (showlab/BoxDiff, ``pipeline/sd_pipeline_boxdiff.py:
_compute_max_attention_per_index`` and ``_compute_loss``)."""

from __future__ import annotations

from .._lazy import torch


def grid_box(box: tuple[float, float, float, float], rows: int, cols: int) -> tuple[int, int, int, int]:
    """A normalised (x0, y0, x1, y1) box on the map grid: each edge times the grid size, rounded half to even
    (Python's ``round``, as the official ``round(pixels / 32)`` of 512-pixel boxes), end-exclusive; widened to at
    least one cell (a box that rounds to nothing would make the official top-k empty and its latents NaN)."""
    x0, y0, x1, y1 = box
    c0, r0 = min(round(x0 * cols), cols - 1), min(round(y0 * rows), rows - 1)
    c1, r1 = max(round(x1 * cols), c0 + 1), max(round(y1 * rows), r0 + 1)
    return c0, r0, min(c1, cols), min(r1, rows)


def top_fraction_mean(values: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the ``floor(fraction * mask.sum())`` largest entries of ``values * mask`` (at least one)."""
    k = max(1, int(fraction * int(mask.sum())))
    return torch.topk((values * mask).flatten(), k).values.mean()


def corner_term(projection: torch.Tensor, target: torch.Tensor, lo: int, hi: int, window: int, size: int):
    """``(1/size) sum_j |projection_j - target_j|`` over the cells within ``window`` of the box edges lo and hi."""
    n = projection.shape[0]
    pick = torch.zeros(n, dtype=torch.bool, device=projection.device)
    for edge in (lo, hi):
        pick[max(edge - window, 0) : min(edge + window, n - 1) + 1] = True
    return ((projection - target).abs() * pick).sum() / size


def boxdiff_terms(x: torch.Tensor, box, top: float = 0.2, window: int = 1) -> dict[str, torch.Tensor]:
    """The three constraints of one subject's (rows, cols) map ``x`` and its normalised box."""
    rows, cols = x.shape
    c0, r0, c1, r1 = grid_box(box, rows, cols)
    mask = torch.zeros(rows, cols, dtype=x.dtype, device=x.device)
    mask[r0:r1, c0:c1] = 1
    inner = top_fraction_mean(x, mask, top)
    outer = top_fraction_mean(x, 1 - mask, top) if int((1 - mask).sum()) else x.new_zeros(())
    gx, gy = mask.amax(0), mask.amax(1)  # the box's projections on the x and y axes
    dx = corner_term(x.amax(0), gx, c0, c1, window, cols)
    dy = corner_term(x.amax(1), gy, r0, r1, window, rows)
    return {"inner": torch.relu(1 - inner), "outer": outer, "corner_x": dx, "corner_y": dy}


def boxdiff_loss(maps: torch.Tensor, boxes: list, top: float = 0.2, window: int = 1) -> tuple[torch.Tensor, float]:
    """Sum over subjects of inner + outer + corner terms (all weights 1); also the largest inner term (the official
    refinement's test). ``maps``: (subjects, rows, cols); ``boxes[k]``: subject k's normalised box."""
    total, worst = maps.new_zeros(()), 0.0
    for k, box in enumerate(boxes):
        terms = boxdiff_terms(maps[k], box, top, window)
        total = total + sum(terms.values())
        worst = max(worst, float(terms["inner"].detach()))
    return total, worst
