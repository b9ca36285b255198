"""The one-run privacy audit of Steinke, Nasr and Jagielski (NeurIPS 2023). Pure math.

Setting: ``m`` canaries, each put into the training data independently with probability ½
(``S_i = +1`` in, ``−1`` out), one training run, then a score per canary from what the
adversary sees. The auditor guesses "in" for the ``k₊`` highest scores, "out" for the
``k₋`` lowest and abstains on the rest: ``r = k₊ + k₋`` guesses, ``v`` of them right.

Their theorem: if the training is (ε, δ)-DP with respect to each canary (add/remove), then
for every ``v``

    P[W ≥ v] ≤ P[Bin(r, p_ε) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Bin(r, p_ε) < v] / i,
    p_ε = e^ε / (1 + e^ε)

(``p_ε`` is the accuracy of ε-DP randomised response, the best any guess can do). So a
right-guess count ``v`` whose right-hand side is below β rejects "(ε, δ)-DP" at confidence
1 − β; the audit's lower bound is the largest ε so rejected. The bound holds whatever the
scores are, so a lower bound above the accounted ε means the mechanism or its accounting is
wrong.

Trying several guess counts and keeping the best would be a multiple test: here the counts
are fixed in advance and β is split over them (Bonferroni), so the reported bound keeps its
stated confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_CONFIDENCE = 0.95


def binomial_pmf(r: int, p: float) -> np.ndarray:
    """``P[Bin(r, p) = k]`` for k = 0..r (log-space, exact to float rounding)."""
    if r < 0 or not (0.0 <= p <= 1.0):
        raise ValueError(f"need r ≥ 0 and p in [0, 1], got r={r}, p={p}")
    k = np.arange(r + 1)
    if p in (0.0, 1.0):
        return (k == (r if p == 1.0 else 0)).astype(float)
    log_comb = np.array([math.lgamma(r + 1) - math.lgamma(i + 1) - math.lgamma(r - i + 1) for i in k])
    return np.exp(log_comb + k * math.log(p) + (r - k) * math.log1p(-p))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of ``≥ v`` right guesses out of ``r`` among ``m`` canaries if the
    training were (ε, δ)-DP (the right-hand side of the theorem, capped at 1)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got m={m}, r={r}, v={v}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need ε ≥ 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    pmf = binomial_pmf(r, p)
    tail = float(pmf[v:].sum())
    if delta > 0 and v > 0:
        # below[i-1] = P[v − i ≤ Bin < v] = pmf[v-1] + … + pmf[v-i], i = 1..v
        below = np.cumsum(pmf[:v][::-1])
        tail += 2.0 * m * delta * float((below / np.arange(1, v + 1)).max())
    return min(tail, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                        tolerance: float = 1e-6) -> float:
    """The largest ε that ``v`` right guesses out of ``r`` reject at ``confidence``: every
    ε below it has ``p_value < 1 − confidence``. 0.0 when not even ε = 0 is rejected."""
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:  # p_value grows with ε and reaches 1
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return lo  # only with δ = 0 and every guess right at huge r: bounded by the search
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float
    guesses: int  # r of the best guess count
    correct: int  # v of the best guess count
    canaries: int  # m
    tried: tuple[int, ...]  # the guess counts fixed in advance (β split over them)


def guess_counts(m: int) -> tuple[int, ...]:
    """Guess counts fixed before looking at the scores: a few sizes up to all ``m``."""
    counts = {c for c in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if c < m} | {m}
    return tuple(sorted(c for c in counts if c >= 2))


def one_run_audit(scores: Sequence[float], included: Sequence[bool], delta: float,
                  confidence: float = DEFAULT_CONFIDENCE, counts: Sequence[int] | None = None) -> AuditResult:
    """The audit's ε lower bound from canary scores (higher = "more likely in").

    For each guess count ``k`` (default :func:`guess_counts`): "in" for the ⌈k/2⌉ highest
    scores, "out" for the ⌊k/2⌋ lowest; each count is tested at β / (number of counts).
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m != len(included) or m < 2:
        raise ValueError("need one inclusion flag per score and at least two canaries")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    counts = tuple(counts) if counts is not None else guess_counts(m)
    if not counts or any(not 1 <= k <= m for k in counts):
        raise ValueError(f"guess counts must be in 1..{m}")
    order = np.argsort(-scores, kind="stable")  # highest first
    level = 1.0 - (1.0 - confidence) / len(counts)
    best = AuditResult(0.0, 0, 0, m, counts)
    for k in counts:
        k_in, k_out = (k + 1) // 2, k // 2
        right = int(included[order[:k_in]].sum()) + (int((~included[order[m - k_out:]]).sum()) if k_out else 0)
        bound = epsilon_lower_bound(m, k, right, delta, level)
        if bound > best.epsilon_lower_bound:
            best = AuditResult(bound, k, right, m, counts)
    return best
