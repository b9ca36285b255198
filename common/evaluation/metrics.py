"""Top-K ranking metrics and the non-learned baselines of DESIGN §6. Pure numpy.

Conventions, per member with target set T and ranked list L (best first):

* ``recall@K``  = |L[:K] ∩ T| / |T|
* ``hit@K``     = 1 if L[:K] ∩ T is not empty
* ``ndcg@K``    = DCG / IDCG with DCG = Σ_{r≤K, L[r]∈T} 1/log2(r+1), IDCG over min(|T|, K) hits
* ``map@K``     = (1/min(|T|, K)) Σ_{r≤K, L[r]∈T} precision@r

A store reports means over its evaluated members and their count, so the server's
count-weighted mean is the member-weighted mean over the chain.
"""

from __future__ import annotations

import numpy as np

CUTOFFS = (10, 20)
METRIC_NAMES = ("ndcg", "recall", "hit", "map")
METRIC_KEYS = tuple(f"{m}@{k}" for k in CUTOFFS for m in METRIC_NAMES)


def _hit_matrix(ranked: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """hits[n, r] is True when ranked[n, r] is one of member n's target items."""
    n, k = ranked.shape
    big = int(max(ranked.max(initial=0), max((t.max(initial=0) for t in targets), default=0))) + 1
    row_keys = (np.arange(n)[:, None] * big + ranked).ravel()
    target_keys = np.concatenate(
        [i * big + np.unique(t) for i, t in enumerate(targets)] or [np.empty(0, dtype=np.int64)]
    )
    return np.isin(row_keys, target_keys).reshape(n, k)


def per_member_metrics(ranked: np.ndarray, targets: list[np.ndarray], cutoffs=CUTOFFS) -> dict:
    """Metrics for each member (rows of ``ranked``, shape [N, K≥max(cutoffs)]).

    ``targets[n]`` holds member n's target item indices; it must not be empty.
    Returns ``{"ndcg@10": array[N], ...}``.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or ranked.shape[0] != len(targets):
        raise ValueError("ranked must be [N, K] with one target array per row")
    if ranked.shape[1] < max(cutoffs):
        raise ValueError(f"ranked lists need at least {max(cutoffs)} items")
    sizes = np.array([len(np.unique(t)) for t in targets], dtype=float)
    if (sizes == 0).any():
        raise ValueError("every member needs at least one target item")
    hits = _hit_matrix(ranked, targets).astype(float)
    discount = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    out = {}
    for k in cutoffs:
        h = hits[:, :k]
        n_hits = h.sum(axis=1)
        ideal = np.minimum(sizes, k).astype(int)
        idcg = np.cumsum(discount[:k])[ideal - 1]
        precision_at_r = np.cumsum(h, axis=1) / np.arange(1, k + 1)
        out[f"ndcg@{k}"] = (h * discount[:k]).sum(axis=1) / idcg
        out[f"recall@{k}"] = n_hits / sizes
        out[f"hit@{k}"] = (n_hits > 0).astype(float)
        out[f"map@{k}"] = (precision_at_r * h).sum(axis=1) / ideal
    return out


def mean_metrics(ranked: np.ndarray, targets: list[np.ndarray], cutoffs=CUTOFFS) -> dict:
    """Means of :func:`per_member_metrics` over members (0.0 for an empty set)."""
    if len(targets) == 0:
        return {f"{m}@{k}": 0.0 for k in cutoffs for m in METRIC_NAMES}
    return {k: float(v.mean()) for k, v in per_member_metrics(ranked, targets, cutoffs).items()}


def coverage(ranked: np.ndarray, k: int, candidates: np.ndarray) -> float:
    """Share of the candidate items (bool mask over the catalog) that appear in at least one
    member's top-``k`` list; padding beyond the candidates does not count."""
    candidates = np.asarray(candidates, dtype=bool)
    if not candidates.any() or len(ranked) == 0:
        return 0.0
    shown = np.unique(np.asarray(ranked)[:, :k])
    return float(candidates[shown].sum() / candidates.sum())


def category_diversity(ranked: np.ndarray, k: int, item_category: np.ndarray) -> float:
    """Mean over members of (distinct categories in the top-``k`` list) / ``k``."""
    if len(ranked) == 0:
        return 0.0
    cats = np.sort(np.asarray(item_category)[np.asarray(ranked)[:, :k]], axis=1)
    distinct = 1 + (cats[:, 1:] != cats[:, :-1]).sum(axis=1)
    return float(np.mean(distinct / k))


def top_k(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, best first; ties broken by lower index.

    ``allowed`` (bool, [n_items] or [N, n_items]) masks out the rest (assortment, explore).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    k = min(k, scores.shape[1])
    # A stable sort of -scores keeps the lower index first among equal scores.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def popularity_scores(item_counts: np.ndarray, n_rows: int) -> np.ndarray:
    """Store popularity baseline: every member gets the same scores, the item counts."""
    return np.broadcast_to(np.asarray(item_counts, dtype=float), (n_rows, len(item_counts)))


def topfreq_scores(
    history_items: list[np.ndarray],
    history_counts: list[np.ndarray],
    history_last_day: list[np.ndarray],
    fallback: np.ndarray,
) -> np.ndarray:
    """P-TopFreq: the member's most frequently bought items first, then ``fallback`` order.

    Frequency ties are broken by the more recent last purchase. ``fallback`` (store
    popularity) ranks everything the member never bought, below all their own items.
    """
    fallback = np.asarray(fallback, dtype=float)
    span = fallback.max(initial=0.0) - fallback.min(initial=0.0) + 1.0
    base = (fallback - fallback.min(initial=0.0)) / span  # in [0, 1)
    scores = np.tile(base, (len(history_items), 1))
    for n, (items, counts, last) in enumerate(zip(history_items, history_counts, history_last_day)):
        if len(items):
            recency = (last - last.min() + 1.0) / (last.max() - last.min() + 2.0)  # in (0, 1)
            scores[n, items] = 2.0 + counts * 2.0 + recency
    return scores


def ranking_metrics(scores: np.ndarray, targets: list[np.ndarray], allowed: np.ndarray, k: int = 20) -> dict:
    """Mean ranking metrics of top-``k`` lists over ``allowed`` items (members with a target there)."""
    allowed = np.asarray(allowed, dtype=bool)
    rows = [n for n, t in enumerate(targets) if allowed[t].any()]
    if not rows:
        return mean_metrics(np.zeros((0, k), np.int64), [])
    return mean_metrics(top_k(np.asarray(scores)[rows], k, allowed=allowed), [targets[n] for n in rows])
