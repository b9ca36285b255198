"""Checks on the updates stores send, before aggregation. Pure numpy.

An update is rejected when it does not fit the global model (names, shapes, dtypes), holds
NaN or Inf, or moves the model far more than the round's other updates do: its distance to
the global model is above ``norm_factor`` × the median distance of the round's
well-formed updates. A DP update is noisy by design, so the threshold is relative to the
round, not absolute.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def shape_problem(reference: Arrays, update: Arrays) -> str | None:
    """Why ``update`` does not fit ``reference``, or None when it does."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"parameter '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"parameter '{name}' has dtype {got.dtype}, expected {ref.dtype}"
    return None


def distance(reference: Arrays, update: Arrays) -> float:
    """L2 norm of ``update − reference`` over every parameter (NaN if any value is not finite)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def check_updates(reference: Arrays, updates: list[Arrays], norm_factor: float = 10.0) -> list[str | None]:
    """For each update, the reason to reject it, or None to accept it.

    ``norm_factor`` ≤ 0 turns the distance check off.
    """
    reasons: list[str | None] = [shape_problem(reference, u) for u in updates]
    dists = [float("nan")] * len(updates)
    for i, u in enumerate(updates):
        if reasons[i] is None:
            if not all(np.all(np.isfinite(a)) for a in u.values()):
                reasons[i] = "update holds NaN or Inf values"
            else:
                dists[i] = distance(reference, u)
    good = [d for d, r in zip(dists, reasons) if r is None]
    if norm_factor > 0 and len(good) >= 2:
        limit = norm_factor * float(np.median(good))
        for i, d in enumerate(dists):
            if reasons[i] is None and d > limit:
                reasons[i] = f"update moves the model by {d:.4g}, over {norm_factor:g} × the round's median {limit / norm_factor:.4g}"
    return reasons
