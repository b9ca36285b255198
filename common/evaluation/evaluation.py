"""Evaluation at a store (DESIGN §6): the model and the baselines on the same test split.

Candidates are the store's assortment (items sold there in the training period). Each
function returns mean metrics over the store's evaluated members; the count of members
goes with them so that the chain-wide mean is member-weighted.
"""

from __future__ import annotations

import numpy as np

from common.evaluation.audience import AUDIENCE_K, audience_metrics
from common.data.dataset import Examples, StoreData, history_arrays
from common.evaluation.metrics import (CUTOFFS, category_diversity, coverage, mean_metrics, popularity_scores, top_k,
                            topfreq_scores)
from common.learning.model import Recommender
from common.learning.training import predict

LIST_LENGTH = 20


def model_scores(model: Recommender, data: StoreData) -> np.ndarray:
    """Model scores of every catalog item for each evaluated member, [E, n_items]."""
    return predict(model, data.eval_examples)


def _evaluate_scores(scores: np.ndarray, data: StoreData) -> dict:
    ranked = top_k(scores, LIST_LENGTH, allowed=data.assortment)
    return mean_metrics(ranked, data.eval_targets)


def evaluate_scores(scores: np.ndarray, data: StoreData) -> dict:
    """Mean metrics of the top-K lists of given scores [E, n_items] over the evaluated members."""
    if len(data.eval_member_ids) == 0:
        return mean_metrics(np.zeros((0, LIST_LENGTH), np.int64), [])
    return _evaluate_scores(scores, data)


def evaluate_model(model: Recommender, data: StoreData) -> dict:
    """Mean metrics of the model's top-K lists over the store's evaluated members."""
    if len(data.eval_member_ids) == 0:
        return mean_metrics(np.zeros((0, LIST_LENGTH), np.int64), [])
    return _evaluate_scores(model_scores(model, data), data)


def explore_view(data: StoreData) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The "explore" task: items the member had not bought before the cut.

    Returns ``(rows, allowed [len(rows), n_items], targets)``: the evaluated members whose
    test basket holds at least one new item, the candidates left for each (assortment minus
    their history) and their new target items.
    """
    rows, targets = [], []
    for n, (target, history) in enumerate(zip(data.eval_targets, data.eval_history_items)):
        new = np.setdiff1d(target, history)
        if len(new):
            rows.append(n)
            targets.append(new)
    rows = np.asarray(rows, dtype=np.int64)
    allowed = np.tile(data.assortment, (len(rows), 1))
    for r, n in enumerate(rows):
        allowed[r, data.eval_history_items[n]] = False
    return rows, allowed, targets


def _list_metrics(ranked: np.ndarray, targets: list[np.ndarray], candidates: np.ndarray, category: np.ndarray) -> dict:
    out = mean_metrics(ranked, targets)
    for k in CUTOFFS:
        out[f"coverage@{k}"] = coverage(ranked, k, candidates)
        out[f"diversity@{k}"] = category_diversity(ranked, k, category)
    out["members"] = len(targets)
    return out


def list_report(scores: np.ndarray, data: StoreData) -> dict:
    """All list metrics of DESIGN §6 for one scoring of the store's evaluated members.

    ``{"all": {...}, "explore": {...}}``, each with the ranking metrics @10/@20, coverage
    (share of the assortment that some list shows), category diversity and ``members``.
    ``scores`` is [E, n_items] (a 1-row array broadcasts: the same scores for everyone).
    """
    n = len(data.eval_member_ids)
    scores = np.broadcast_to(scores, (n, data.items.n_items))
    ranked = top_k(scores, LIST_LENGTH, allowed=data.assortment) if n else np.zeros((0, LIST_LENGTH), np.int64)
    rows, allowed, new_targets = explore_view(data)
    explore_ranked = (top_k(scores[rows], LIST_LENGTH, allowed=allowed) if len(rows)
                      else np.zeros((0, LIST_LENGTH), np.int64))
    return {"all": _list_metrics(ranked, data.eval_targets, data.assortment, data.items.category),
            "explore": _list_metrics(explore_ranked, new_targets, data.assortment, data.items.category)}


def evaluate_baselines(data: StoreData) -> dict:
    """``{"store_pop": metrics, "p_topfreq": metrics}`` on the store's test split."""
    n = len(data.eval_member_ids)
    if n == 0:
        empty = mean_metrics(np.zeros((0, LIST_LENGTH), np.int64), [])
        return {"store_pop": empty, "p_topfreq": dict(empty)}
    pop = popularity_scores(data.store_counts, n)
    freq = topfreq_scores(data.eval_history_items, data.eval_history_counts,
                          data.eval_history_last_day, data.store_counts)
    return {"store_pop": _evaluate_scores(pop, data), "p_topfreq": _evaluate_scores(freq, data)}


def member_scores(model: Recommender, data: StoreData) -> np.ndarray:
    """Scores of every item for every training member, from their whole pre-cut history."""
    log = data.train_log
    n = data.n_train_members
    items, feat, mask = history_arrays(log, log.n_receipts(), np.full(n, data.cut_day), data.example_cfg)
    no_target = np.zeros((n, 1), np.int64)
    return predict(model, Examples(items, feat, mask, data.profile, no_target, np.zeros((n, 1), np.float32)))


def evaluate_audience(model: Recommender, data: StoreData) -> dict:
    """Goods find people: for the test period's best sellers, rank the store's members.

    ``{"model": {...}, "member_pop": {...}}`` with mean ROC-AUC and recall@100; the
    baseline ranks members by how much they bought before the cut.
    """
    if data.n_train_members == 0 or len(data.audience_items) == 0:
        empty = {"auc": 0.0, f"recall@{AUDIENCE_K}": 0.0, "items": 0}
        return {"model": empty, "member_pop": dict(empty)}
    return {"model": audience_from_scores(member_scores(model, data), data), "member_pop": member_pop_audience(data)}


def audience_from_scores(scores: np.ndarray, data: StoreData) -> dict:
    """Audience figures of given scores of every item for every training member, [M, n_items]."""
    if data.n_train_members == 0 or len(data.audience_items) == 0:
        return {"auc": 0.0, f"recall@{AUDIENCE_K}": 0.0, "items": 0}
    return audience_metrics(scores, data.audience_bought, data.audience_items)


def member_pop_audience(data: StoreData) -> dict:
    """The audience baseline: members ranked by how many units they bought before the cut."""
    if data.n_train_members == 0 or len(data.audience_items) == 0:
        return {"auc": 0.0, f"recall@{AUDIENCE_K}": 0.0, "items": 0}
    popularity = np.broadcast_to(data.member_activity[:, None], (data.n_train_members, data.items.n_items))
    return audience_metrics(popularity, data.audience_bought, data.audience_items)
