"""SynGen (Rassin et al., NeurIPS 2023, arXiv:2306.08877): bind each modifier to its noun by a symmetric KL
between their attention maps, and push both away from the other prompt tokens (official code:
RoyiRa/Linguistic-Binding-in-Diffusion-Models, ``compute_loss.py``)."""

from __future__ import annotations

from .._lazy import torch


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` of the maps normalised to spatial distributions (natural log)."""
    p = a.flatten() / a.sum()
    q = b.flatten() / b.sum()
    p, q = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
    return 0.5 * ((p * (p.log() - q.log())).sum() + (q * (q.log() - p.log())).sum())


def _word_distance(x: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
    """A multi-piece word against another: the largest distance over piece pairs."""
    return torch.stack([symmetric_kl(a, b) for a in x for b in y]).max()


def syngen_group_loss(
    modifiers: list[list[torch.Tensor]], noun: list[torch.Tensor], others: list[torch.Tensor]
) -> torch.Tensor:
    """One (modifiers, noun) group: for each modifier m,
    ``d(m, n) + 1/2 (-mean_u d(m, u) - mean_u d(n, u))`` over the other prompt tokens u (each word a list of its
    pieces' maps). A noun without modifiers: ``-mean_u d(n, u)``."""

    def outside(word):
        if not others:
            return noun[0].new_zeros(())
        return torch.stack([_word_distance(word, [u]) for u in others]).mean()

    if not modifiers:
        return -outside(noun)
    total = noun[0].new_zeros(())
    for m in modifiers:
        total = total + _word_distance(m, noun) + 0.5 * (-outside(m) - outside(noun))
    return total
