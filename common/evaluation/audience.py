""""Goods find people": for an item, which members (DESIGN §5). Pure numpy.

The same scores that rank items for a member rank a store's members for an item. At the
store, for each of its best sellers of the test period, the members are ranked by score and
the ranking is judged by whether it finds the members who bought the item in that period.
Only these aggregate figures may leave the store; member lists never do.
"""

from __future__ import annotations

import numpy as np

AUDIENCE_ITEMS = 50
AUDIENCE_K = 100


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random buyer scores above a random non-buyer (ties count ½).

    NaN when all members are buyers or none is.
    """
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U from average ranks (ties get the mean of their ranks).
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # ranks a+1 … b, averaged
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def recall_at_k(scores: np.ndarray, positive: np.ndarray, k: int = AUDIENCE_K) -> float:
    """Share of the buyers found among the ``k`` best-scored members (ties by lower index)."""
    positive = np.asarray(positive, dtype=bool)
    if positive.sum() == 0:
        return float("nan")
    top = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]
    return float(positive[top].sum() / positive.sum())


def audience_metrics(member_scores: np.ndarray, bought: np.ndarray, items: np.ndarray,
                     k: int = AUDIENCE_K) -> dict:
    """Mean AUC and recall@k over ``items``.

    ``member_scores[m, i]``: score of item i for member m; ``bought[m, j]``: member m bought
    ``items[j]``. Items that every member or no member bought are left out of the means.
    """
    aucs, recalls = [], []
    for j, item in enumerate(items):
        auc = roc_auc(member_scores[:, item], bought[:, j])
        if not np.isnan(auc):
            aucs.append(auc)
            recalls.append(recall_at_k(member_scores[:, item], bought[:, j], k))
    return {"auc": float(np.mean(aucs)) if aucs else 0.0,
            f"recall@{k}": float(np.mean(recalls)) if recalls else 0.0,
            "items": len(aucs)}
