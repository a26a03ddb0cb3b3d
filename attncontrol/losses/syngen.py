"""SynGen (Rassin et al., NeurIPS 2023, arXiv:2306.08877): bind each modifier to its noun by a symmetric KL
between their attention maps, and push both away from the other prompt tokens (official code:
RoyiRa/Linguistic-Binding-in-Diffusion-Models, ``compute_loss.py``)."""

from __future__ import annotations

from .._lazy import torch

FLOAT32_EPS = 2.0**-23  # torch.finfo(torch.float32).eps: the official pipeline's maps are float32


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, eps: float = FLOAT32_EPS) -> torch.Tensor:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` of the maps normalised to spatial distributions (natural log).

    As the official ``compute_loss.py:_symmetric_kl`` (``torch.distributions.Categorical(probs=...)`` and
    ``kl_divergence``): the weights are the probabilities themselves, unclamped; only the logs are taken of the
    probabilities clamped to ``[eps, 1 - eps]`` (``clamp_probs``, float32's eps). One difference, kept: where one
    map is exactly 0 and the other is not, the official KL is infinite; here it stays finite (the log of eps)."""
    p = a.flatten() / a.sum()
    q = b.flatten() / b.sum()
    log_p, log_q = p.clamp(eps, 1 - eps).log(), q.clamp(eps, 1 - eps).log()
    return 0.5 * ((p * (log_p - log_q)).sum() + (q * (log_q - log_p)).sum())


def _word_distance(x: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
    """A multi-piece word against another: the largest distance over piece pairs."""
    return torch.stack([symmetric_kl(a, b) for a in x for b in y]).max()


def syngen_group_loss(
    modifiers: list[list[torch.Tensor]], noun: list[torch.Tensor], others: list[torch.Tensor]
) -> torch.Tensor:
    """One (modifiers, noun) group: for each modifier m,
    ``d(m, n) + 1/2 (-mean_u d(m, u) - mean_u d(n, u))`` over ``others``, the group's outside tokens u (each word a
    list of its pieces' maps). A noun without modifiers: ``-mean_u d(n, u)``."""

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
