"""Divide & Bind (Li et al., BMVC 2023, arXiv:2307.10864), as the official code computes it
(boschresearch/Divide-and-Bind, ``divide_and_bind/pipeline_divide_and_bind.py:_compute_loss_geiven_attn_map``)."""

from __future__ import annotations

from .._lazy import torch


def total_variation(x: torch.Tensor, form: str = "official") -> torch.Tensor:
    """Attendance measure of a (rows, cols) map: mean absolute horizontal neighbour difference plus a vertical
    term. ``form="official"``: as coded, the last row against every row from the second on (0 for two rows);
    ``"neighbour"``: the mean absolute vertical neighbour difference (the paper's form)."""
    horizontal = (x[:, :-1] - x[:, 1:]).abs().mean()
    upper = x[:-1, :] if form == "neighbour" else x[-1:, :]  # as coded: the last row, broadcast
    return horizontal + (upper - x[1:, :]).abs().mean()


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``0.5 KL(p || m) + 0.5 KL(q || m)``, m = (p + q) / 2, natural log, over all entries (not renormalised)."""
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())).sum() + 0.5 * (q * (q.log() - m.log())).sum()


def binding_divergence(subject: torch.Tensor, attribute: torch.Tensor, subject_tv: torch.Tensor) -> torch.Tensor:
    """JSD between a subject's and its attribute's spatial distributions: the attribute rescaled to the subject's
    peak, each softmaxed over the pixels, both shifted down by q * max(subject distribution) (q = 0.3 when the
    subject's TV < 0.1, else 0.2), clipped at 0, plus 1e-5."""
    scaled = attribute / attribute.max().clamp_min(1e-12) * subject.max()
    p, q = torch.softmax(subject.flatten(), 0), torch.softmax(scaled.flatten(), 0)
    quantile = 0.3 if float(subject_tv.detach()) < 0.1 else 0.2
    cut = quantile * p.max()
    return jensen_shannon(torch.relu(p - cut) + 1e-5, torch.relu(q - cut) + 1e-5)


def binding_weight(step: int) -> float:
    """The official weight of the binding term: 1 before step 10, 5 before step 20, 10 after."""
    return 1.0 if step < 10 else 5.0 if step < 20 else 10.0


def divide_bind_loss(
    subjects: torch.Tensor, attributes: list[list[torch.Tensor]], step: int, form: str = "official"
) -> tuple[torch.Tensor, float]:
    """``max_j (-TV(S_j) + w(step) * sum_a JSD(S_j, A_a))`` over subjects j and their attribute maps; returns (loss,
    the smallest subject TV, which the refinement compares with its thresholds)."""
    terms, tvs = [], []
    for j in range(subjects.shape[0]):
        tv = total_variation(subjects[j], form)
        term = -tv
        for attr in attributes[j]:
            term = term + binding_weight(step) * binding_divergence(subjects[j], attr, tv)
        terms.append(term)
        tvs.append(float(tv.detach()))
    return torch.stack(terms).max(), min(tvs)
