"""CONFORM (Meral et al., CVPR 2024, arXiv:2312.06059): a contrastive objective over attention maps, the NT-Xent
loss of pytorch-metric-learning (v2.5.0, ``NTXentLoss``) that the official code (gemlab-vt/CONFORM,
``pipeline_conform.py:_compute_contrastive_loss``) applies to the flattened maps."""

from __future__ import annotations

from .._lazy import torch


def nt_xent(embeddings: torch.Tensor, labels: list[int], temperature: float = 0.5) -> torch.Tensor:
    """Mean over ordered positive pairs (x, y) (same label, x != y) of
    ``-log(exp(s_xy / t) / (exp(s_xy / t) + sum_{n: label n != label x} exp(s_xn / t)))``, s the cosine
    similarity; other positives are not in the denominator. 0 when no pair shares a label."""
    e = embeddings.flatten(1)
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (e @ e.T) / temperature
    lab = torch.tensor(labels, device=e.device)
    same = lab[:, None] == lab[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=e.device)
    positive = same & ~eye
    if not bool(positive.any()):
        return sim.new_zeros(())
    negatives = torch.where(~same, sim.exp(), torch.zeros_like(sim)).sum(1, keepdim=True)  # per anchor x
    pos = sim.exp()
    terms = -torch.log(pos / (pos + negatives) + 1.2e-38)
    return terms[positive].mean()
