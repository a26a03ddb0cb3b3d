"""Summary statistics for eval: mean +- sample standard deviation, percentile bootstrap intervals, and a paired
comparison of a method with the baseline over the same prompts and seeds (two-sided sign-flip test)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def bootstrap_ci(values: Sequence[float], reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``reps`` resamples with replacement (fixed ``seed``, so a
    table is reproducible)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 1:
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(reps, data.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def sign_flip_p(diffs: Sequence[float], reps: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip (permutation) test that the mean difference is zero: the share of
    sign assignments whose |mean| reaches the observed one. Exact (all 2^n assignments) for n <= 16, else
    ``reps`` random assignments plus the observed one."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    observed = abs(d.mean()) - 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))
    if n <= 16:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(np.mean(np.abs(signs @ d / n) >= observed))
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(reps, n)) * 2 - 1
    return float((np.sum(np.abs(signs @ d / n) >= observed) + 1) / (reps + 1))


def paired_comparison(pairs: Sequence[tuple[float, float]], reps: int = 2000, seed: int = 0) -> dict:
    """A method against the baseline on the same (prompt, seed) images: ``pairs`` of (method, baseline) values.
    Returns n, the mean difference, its bootstrap interval and the sign-flip p-value."""
    diffs = [a - b for a, b in pairs]
    lo, hi = bootstrap_ci(diffs, reps=reps, seed=seed)
    return {"n": len(diffs), "delta": sum(diffs) / len(diffs), "ci_low": lo, "ci_high": hi, "p": sign_flip_p(diffs)}
