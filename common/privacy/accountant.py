"""Privacy accounting for one store (DESIGN §4.2). Pure: no files, no Flower.

A store's history is the list of DP-SGD mechanisms it ran, one entry per training round:
``(noise_multiplier, sample_rate, steps)`` — the format of Opacus' accountants, so anyone
can recompute ε from it. ε always composes over the *whole* history, never one round.
A round's sampling rate and steps follow from the store's published size and the batch
size (:func:`sample_rate_for`, :func:`steps_per_epoch`); δ from the published size too
(:func:`store_delta`). Which history a store counts, and when: :mod:`client.dp_round`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Iterable, Sequence

# The σ range the accountant handles is also the range a run may set: one definition, in the run config.
from common.config import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

ACCOUNTANTS = ("prv", "rdp")
DEFAULT_DELTA = 1e-6

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def store_delta(n_members: int, default: float = DEFAULT_DELTA) -> float:
    """δ for a store: the default, or 1 / (10 × members) when that is smaller (DESIGN §4.1)."""
    if n_members <= 0:
        return default
    return min(default, 1.0 / (10.0 * n_members))


# --- the sampling of a round's DP-SGD steps: what q, the steps and the divisor are

def steps_per_epoch(n_members: int, batch_size: int) -> int:
    """Steps in one epoch: ⌈members / batch_size⌉, the length of the plain loader."""
    return max(1, math.ceil(max(n_members, 1) / batch_size))


def sample_rate_for(n_members: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus uses: 1 / steps per epoch (≤ batch_size / members)."""
    return 1.0 / steps_per_epoch(n_members, batch_size)


def expected_batch(published_size: int, sample_rate: float) -> int:
    """The divisor of the noised sum: Opacus' ``int(N · q)``, with N the published size."""
    return max(1, int(published_size * sample_rate))


# --- ε of a history of mechanisms

def merge_history(history: Iterable[Mechanism]) -> list[Mechanism]:
    """Entries with the same (σ, q) summed into one, in first-seen order.

    Composition is commutative, so this changes no ε; it makes PRV cost grow with the
    number of distinct settings rather than with the number of rounds.
    """
    steps: dict[tuple[float, float], int] = {}
    for s, q, t in history:
        if int(t) > 0:
            key = (float(s), float(q))
            steps[key] = steps.get(key, 0) + int(t)
    return [(s, q, t) for (s, q), t in steps.items()]


def _accountant(kind: str, history: Sequence[Mechanism]):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant '{kind}'; use one of {', '.join(ACCOUNTANTS)}")
    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    acc.history = merge_history(history)
    return acc


def epsilon(history: Iterable[Mechanism], delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` after every mechanism of ``history``, composed; 0.0 for no training.

    A mechanism with σ = 0 (no noise) has unbounded ε: ``math.inf`` is returned.
    """
    history = [h for h in history if int(h[2]) > 0]
    if not history:
        return 0.0
    if any(float(s) <= 0 for s, _, _ in history):
        return math.inf
    return _epsilon_of(tuple(merge_history(history)), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """ε of a merged, non-empty history. Memoised: it is a pure function of public
    settings, and a simulation asks it for many stores with the same settings (a PRV
    evaluation takes ~0.4 s, which would otherwise dominate a small store's round)."""
    acc = _accountant(accountant, history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == "prv":
            try:
                # Opacus' PRV returns the upper end of its estimate (estimate + eps_error).
                eps = float(acc.get_epsilon(delta=delta, eps_error=0.01))
                if math.isfinite(eps):
                    return eps
            except (RuntimeError, ValueError):
                pass
            # PRV's numerics fail in some extreme regimes; RDP is a valid, looser bound.
            return _epsilon_of(history, delta, "rdp")
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", prior: Sequence[Mechanism] = ()) -> float:
    """The smallest σ (within 1 %) such that ``prior`` plus ``steps`` steps at ``sample_rate``
    and σ stays at or below ``target_epsilon``.

    Bisection on σ with :func:`epsilon` itself, so calibration and reporting can never
    disagree. Raises ``ValueError`` when the prior history alone exceeds the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):  # NaN fails it too
        raise ValueError("target epsilon must be finite and > 0")
    if steps <= 0:
        return 0.0
    if prior and not (epsilon(prior, delta, accountant) < target_epsilon):
        raise ValueError("the budget is already spent by earlier training")

    def eps_at(sigma: float, kind: str = accountant) -> float:
        return epsilon([*prior, (sigma, sample_rate, steps)], delta, kind)

    # Bracket with RDP first: it is fast and never below PRV, so the RDP answer is a σ
    # that certainly meets the target; PRV then only refines downwards from there.
    lo, hi = MIN_NOISE_MULTIPLIER, 1.0
    while eps_at(hi, "rdp") > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches that epsilon")
        lo, hi = hi, min(hi * 2.0, MAX_NOISE_MULTIPLIER)
    hi = _bisect(lambda s: eps_at(s, "rdp"), target_epsilon, lo, hi)
    if accountant == "rdp":
        return hi
    lo = max(0.5 * hi, MIN_NOISE_MULTIPLIER)
    while eps_at(hi) > target_epsilon:  # PRV's upper estimate can sit just above RDP's
        if hi >= MAX_NOISE_MULTIPLIER:  # bounded like the RDP search: never an endless loop
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches that epsilon")
        lo, hi = hi, min(hi * 1.25, MAX_NOISE_MULTIPLIER)
    return _bisect(eps_at, target_epsilon, lo, hi)


def _bisect(eps_at, target: float, lo: float, hi: float) -> float:
    """Smallest σ in [lo, hi] (to 0.5 %) with eps_at(σ) ≤ target; eps_at(hi) must meet it."""
    if eps_at(lo) <= target:
        return lo
    while hi - lo > 0.005 * hi:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi
