"""Attention Refocusing (Phung et al., CVPR 2024, arXiv:2306.05427): cross-attention refocusing (CAR) and
self-attention refocusing (SAR), as the official code implements them (tiered weights)."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch

Box = tuple[float, float, float, float]


def box_cells(box: Box, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) grid slice of a normalised (x0, y0, x1, y1) box: floor of each edge, as the official
    code does (rows = y), widened to at least one cell so a small box still gets gradient."""
    x0, y0, x1, y1 = box
    c0, r0, c1, r1 = int(x0 * cols), int(y0 * rows), int(x1 * cols), int(y1 * rows)
    r0, c0 = min(r0, rows - 1), min(c0, cols - 1)
    return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


def box_mask(box: Box, rows: int, cols: int, device=None) -> torch.Tensor:
    r0, r1, c0, c1 = box_cells(box, rows, cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    mask[r0:r1, c0:c1] = True
    return mask


@dataclass(frozen=True)
class CARWeights:
    """The official code's tiers (``caculate_loss_att_fixed_cnt``)."""

    inside_low: float = 0.1  # below: weight 6
    inside_mid: float = 0.2  # below: weight 1; above: weight 1 only before ``late_step``
    outside_high: float = 0.15  # above: weight 4
    outside_mid: float = 0.1  # above: weight 1; below: weight 1 only before ``late_step``
    strong_inside: float = 6.0
    strong_outside: float = 4.0
    late_step: int = 15
    tiered: bool = True  # False: the paper's plain form, every term with weight 1


def car_loss(
    maps: torch.Tensor, boxes: list[list[Box]], step: int, weights: CARWeights = CARWeights()
) -> tuple[torch.Tensor, float]:
    """CAR for one image. ``maps``: (subjects, rows, cols), token-softmaxed and smoothed; ``boxes[k]``: subject
    k's boxes. Returns (loss, the smallest max-inside attention over all boxes).

    Per subject k: for each own box, reward its peak inside (``1 - max``); for each box of another subject,
    penalise k's peak there (with k's own boxes masked out); penalise k's peak outside every box, times the
    number of k's boxes / 2. Summed, divided by the number of subjects.
    """
    n, rows, cols = maps.shape
    masks = [[box_mask(b, rows, cols, maps.device) for b in subject] for subject in boxes]
    every = torch.zeros(rows, cols, dtype=torch.bool, device=maps.device)
    for subject in masks:
        for m in subject:
            every |= m
    total = maps.new_zeros(())
    min_inside = float("inf")
    w = weights
    late = step >= w.late_step
    for k in range(n):
        own = torch.zeros_like(every)
        for m in masks[k]:
            peak = maps[k][m].max()
            min_inside = min(min_inside, float(peak.detach()))
            if not w.tiered:
                total = total + (1 - peak)
            elif peak < w.inside_low:
                total = total + w.strong_inside * (1 - peak)
            elif peak < w.inside_mid or not late:
                total = total + (1 - peak)
            own |= m
        other_map = maps[k].masked_fill(own, 0.0)
        for j in range(n):
            if j == k:
                continue
            for m in masks[j]:
                peak = other_map[m].max()
                if not w.tiered:
                    total = total + peak
                elif peak > w.outside_high:
                    total = total + w.strong_outside * peak
                elif peak > w.outside_mid or not late:
                    total = total + peak
        background = maps[k].masked_fill(every, 0.0).max()
        total = total + len(masks[k]) * background / 2
    return total / n, min_inside


def sar_loss(self_attn: torch.Tensor, boxes: list[list[Box]]) -> torch.Tensor:
    """SAR for one image. ``self_attn``: (rows, cols, keys) with keys = the rows x cols pixels, row-major.
    For each box: the mean, over the query pixels inside it, of the attention mass on keys outside it.
    Summed over boxes, divided by the number of subjects."""
    rows, cols, keys = self_attn.shape
    if keys != rows * cols:
        raise ValueError(f"self-attention maps must have rows*cols={rows * cols} keys, got {keys}")
    flat = self_attn.reshape(rows * cols, keys)
    total = flat.new_zeros(())
    for subject in boxes:
        for b in subject:
            inside = box_mask(b, rows, cols, flat.device).flatten()
            total = total + flat[inside][:, ~inside].sum(-1).mean()
    return total / len(boxes)
