"""Campaign audiences at the store (DESIGN §5.4): a member's calibrated probability of buying
(or redeeming a coupon on) any item of a set. Pure numpy and pandas.

Rule for many items: the model gives each member a log-probability per catalog item for
their next purchase; the set's score is their log-sum-exp over the set's items, i.e. the log
of the predicted share of the member's next purchase that falls in the set. It needs no cap
on the set's size (a Type A campaign has 36k products) and is monotone in adding items.

Score: a fixed combination (set by hand, not fitted; :func:`combined_score`) of the member's
own history at the store — past lines of the set's items, recent baskets, and for ``redeem``
their coupon lines — and the model's set score relative to the store's median (log rate +
log share ≈ log expected purchases of the set).

Calibration: Platt scaling at the store — a one-feature logistic regression of that score,
fitted on the store's own members with lines there: the score as of 28 days before the
request's day (the model's part too, from histories cut at that day), the label whether the
member bought an item of the set (``buy``) or used any coupon (``redeem``: a coupon on the
set's own items is too rare at one store in 28 days to fit on) at the store in those 28 days. Its probability is what a chain can merge across stores: each
store estimates the same event for its own members. It keeps each store's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

FEATURES = ("model_set_score", "baskets_8w", "coupon_lines", "set_lines", "set_coupon_lines")
OBJECTIVES = ("buy", "redeem")
CALIBRATION_DAYS = 28
ACTIVE_DAYS = 56
L2 = 1.0  # on standardized features: keeps a store with few positives near its base rate


def set_log_share(logp: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """log Σ_{i ∈ set} exp(logp[m, i]) for each member (−inf for an empty set), [M]."""
    columns = np.asarray(columns, dtype=np.int64)
    if len(columns) == 0:
        return np.full(logp.shape[0], -np.inf)
    sub = np.asarray(logp, dtype=np.float64)[:, columns]
    top = sub.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(sub - top).sum(axis=1, keepdims=True)))[:, 0]


def history_features(lines: pd.DataFrame, members: np.ndarray, items: set | np.ndarray, before_day: float) -> np.ndarray:
    """The history columns of :data:`FEATURES` (all but the model's) for ``members``, from
    ``lines`` strictly before ``before_day``: [M, 4], log1p of counts.

    ``lines`` has columns member, day (float days), basket, item, coupon (bool: a coupon
    discount on the line). Lines on or after ``before_day`` are dropped first, so nothing
    later can reach a feature.
    """
    past = lines[lines["day"] < before_day]
    in_set = past["item"].isin(items)
    recent = past[past["day"] >= before_day - ACTIVE_DAYS]
    cols = [recent.groupby("member")["basket"].nunique(),
            past[past["coupon"]].groupby("member").size(),
            past[in_set].groupby("member").size(),
            past[in_set & past["coupon"]].groupby("member").size()]
    index = pd.Index(members)
    return np.log1p(np.column_stack([c.reindex(index).fillna(0).to_numpy(float) for c in cols]))


@dataclass(frozen=True)
class Calibration:
    """A fitted logistic calibration on standardized features."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    positives: int
    members: int

    def probability(self, x: np.ndarray) -> np.ndarray:
        z = ((np.asarray(x, float) - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, iters: int = 50) -> Calibration:
    """L2-regularised logistic regression (Newton steps; the intercept unpenalised).

    One pseudo-positive and one pseudo-negative at the features' mean keep the fit finite
    when a store has no positive or no negative (it then predicts near its smoothed base rate).
    ``x`` must be finite.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    scale = x.std(axis=0) if len(x) else np.ones(x.shape[1])
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.vstack([(x - mean) / scale, np.zeros((2, x.shape[1]))])
    t = np.r_[y, 1.0, 0.0]
    a = np.column_stack([z, np.ones(len(z))])
    w = np.zeros(a.shape[1])
    penalty = np.r_[np.full(x.shape[1], l2), 0.0]
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -40, 40)))
        grad = a.T @ (p - t) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return Calibration(w[:-1], float(w[-1]), mean, scale, int(y.sum()), int(len(y)))


def combined_score(model_rel: np.ndarray, history: np.ndarray, objective: str) -> np.ndarray:
    """The fixed score of a member (higher: likelier), from ``history`` (:func:`history_features`'
    columns) and ``model_rel`` (the model's set score minus the store's median; 0: none).

    buy: log1p(set lines) + ½ (log1p(baskets in 8 weeks) + model_rel); redeem: that plus
    log1p(coupon lines) + log1p(coupon lines of the set) — the coupon history that a
    product-only score lacks (issue 25: "past coupon use" beats it on redemption)."""
    h = np.asarray(history, float)
    buy = h[:, 2] + 0.5 * (h[:, 0] + np.asarray(model_rel, float))
    if objective == "buy":
        return buy
    return buy + h[:, 1] + h[:, 3]


def relative_model_score(model_score: np.ndarray) -> np.ndarray:
    """The model's set score minus its median over the finite ones; 0 where there is none."""
    s = np.asarray(model_score, float)
    finite = np.isfinite(s)
    if not finite.any():
        return np.zeros(len(s))
    return np.where(finite, s - np.median(s[finite]), 0.0)
