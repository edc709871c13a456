"""The statistics of ``loramix compare``: numpy only, seeded, small enough to check by hand.

Mean over seeds with a 95% Student t interval::

    mean = Σ a_s / S,   sd = sqrt(Σ (a_s - mean)² / (S - 1)),   mean ± t_{0.975, S-1} · sd / sqrt(S)

Paired difference of a method against the baseline, over the same questions and seeds. ``D`` holds
one (S, Q_t) matrix per task: D[s, q] = correct(method, seed s, question q) - correct(baseline, s, q)
(each entry -1, 0 or +1; a baseline without seeds, the base model, is the same row for every s). The
statistic is the mean over tasks of each task's mean difference::

    d̂ = (1 / T) Σ_t mean_{s, q} D_t[s, q]

The paired bootstrap redraws seeds and questions with replacement, the same draw for the method and
the baseline (that is the pairing), and recomputes d̂ on the draw, B times. For replicate b::

    seeds  s_1..s_S ~ U{0..S-1}            (one draw, shared by every task)
    per task t: questions q_1..q_Qt ~ U{0..Q_t-1}
    d_b = (1 / T) Σ_t (1 / (S Q_t)) Σ_i Σ_j D_t[s_i, q_j]

Draw order (what a hand computation must repeat): ``rng = np.random.default_rng(seed)``; all B seed
draws ``rng.integers(0, S, (B, S))``; then for each task in order ``rng.integers(0, Q_t, (B, Q_t))``.
Interval: the 2.5th and 97.5th percentiles of d_1..d_B (numpy's linear interpolation). Two-sided
p-value of "no difference", by the shifted bootstrap (the d_b centred on d̂ stand for the null)::

    p = (1 + #{b : |d_b - d̂| >= |d̂|}) / (B + 1)

Example:
    >>> t_interval([0.5, 0.6, 0.7])                  # (0.6, 0.2484...)
    >>> paired_bootstrap([np.array([[1, 0, 0, 1]])], samples=1000, seed=0)["p"]
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# t_{0.975, df} for df = 1..30 (the standard table; beyond it the Cornish-Fisher expansion below is
# within 1e-4 of the exact quantile)
T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
        2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688,
        2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845,
        2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
        2.045229642, 2.042272456)
Z975 = 1.959963985


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the factor of a two-sided 95% interval with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% t interval) of ``values`` (one per seed); half-width None for one value."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("t_interval needs at least one value")
    if a.size == 1:
        return float(a[0]), None
    return float(a.mean()), t_quantile_975(a.size - 1) * float(a.std(ddof=1)) / math.sqrt(a.size)


def paired_bootstrap(diffs: Sequence[np.ndarray], *, samples: int = 10000, seed: int = 0,
                     chunk: int = 1000) -> dict[str, float]:
    """Paired bootstrap of the mean difference (see the module docstring for the exact procedure).

    Args:
        diffs: per task, an (S, Q_t) array of per-question differences (method - baseline) for the
            same S seeds (S equal across tasks) and that task's Q_t questions.
        samples: B, the number of bootstrap replicates. seed: seed of ``np.random.default_rng``.
        chunk: replicates computed at a time (memory: chunk x Q_t counts).

    Returns:
        ``{"diff": d̂, "low": 2.5th percentile, "high": 97.5th percentile, "p": two-sided p-value,
        "seeds": S, "questions": Σ Q_t}``.
    """
    mats = [np.asarray(d, dtype=float) for d in diffs]
    if not mats or any(m.ndim != 2 or m.size == 0 for m in mats) or len({m.shape[0] for m in mats}) != 1:
        raise ValueError("paired_bootstrap needs one non-empty (seeds, questions) array per task, with equal seeds")
    n_seeds = mats[0].shape[0]
    estimate = float(np.mean([m.mean() for m in mats]))
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, (samples, n_seeds))
    question_draws = [rng.integers(0, m.shape[1], (samples, m.shape[1])) for m in mats]
    stats = np.zeros(samples)
    for start in range(0, samples, chunk):
        rows = slice(start, min(start + chunk, samples))
        seed_counts = _counts(seed_draws[rows], n_seeds)  # (b, S): how often each seed was drawn
        for m, draws in zip(mats, question_draws):
            q_counts = _counts(draws[rows], m.shape[1])  # (b, Q)
            # Σ_i Σ_j D[s_i, q_j] = Σ_s Σ_q count_s · D[s, q] · count_q
            stats[rows] += np.einsum("bs,sq,bq->b", seed_counts, m, q_counts) / (n_seeds * m.shape[1])
    stats /= len(mats)
    low, high = np.percentile(stats, [2.5, 97.5])
    p = (1 + int(np.sum(np.abs(stats - estimate) >= abs(estimate)))) / (samples + 1)
    return {"diff": estimate, "low": float(low), "high": float(high), "p": p, "seeds": n_seeds,
            "questions": sum(m.shape[1] for m in mats)}


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """(b, k) draws of indices in [0, size) → (b, size) counts of each index per row."""
    out = np.zeros((draws.shape[0], size))
    np.add.at(out, (np.arange(draws.shape[0])[:, None], draws), 1)
    return out
