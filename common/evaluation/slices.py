"""Cold-start slices of the quality report (issue 16): cold members and items new to a store. Pure.

* **cold members**: evaluated members with at most ``COLD_RECEIPTS`` receipts before the cut;
  the usual list metrics over them (candidates: the store's assortment).
* **new items**: target items the store did not sell in the training period (first sold in
  the test period, or never before at this store). The assortment excludes them by
  definition, so here the lists are drawn from the whole public catalog, as if the store
  stocked every item, with the discovery places a served list keeps for items new to the
  store (DESIGN §5.2): ``recall@20`` of the new target items, and their ``share`` of all
  target items found in those lists.
"""

from __future__ import annotations

import numpy as np

from common.data.dataset import StoreData
from common.evaluation.metrics import mean_metrics, top_k
from common.learning.recommend import with_discovery

COLD_RECEIPTS = 2
LIST = 20


def receipts_before_cut(data: StoreData) -> np.ndarray:
    """Receipts before the cut of each evaluated member (0 for a member with none)."""
    row = {m: i for i, m in enumerate(data.member_ids)}
    n = data.train_log.n_receipts()
    return np.array([n[row[m]] if m in row else 0 for m in data.eval_member_ids], dtype=np.int64)


def cold_slice(scores: np.ndarray, data: StoreData) -> dict:
    """List metrics (ndcg@10, recall@10, …) over the cold members, and their count."""
    cold = np.flatnonzero(receipts_before_cut(data) <= COLD_RECEIPTS)
    scores = np.broadcast_to(scores, (len(data.eval_member_ids), data.items.n_items))
    if len(cold) == 0:
        return {**mean_metrics(np.zeros((0, LIST), np.int64), []), "members": 0}
    ranked = top_k(scores[cold], LIST, allowed=data.assortment)
    return {**mean_metrics(ranked, [data.eval_targets[n] for n in cold]), "members": int(len(cold))}


def new_item_slice(scores: np.ndarray, data: StoreData) -> dict:
    """How lists drawn from the whole catalog, with the store's discovery places, find target
    items new to the store.

    Each member's 20-list is the one the store serves when such items are stocked
    (:func:`common.learning.recommend.with_discovery`): the best 18 the store sold, then the
    best 2 it did not. ``recall@20``: new target items found / new target items (over members
    with one); ``share``: new target items found / all target items found; ``members``, ``items``.
    """
    n = len(data.eval_member_ids)
    scores = np.broadcast_to(scores, (n, data.items.n_items))
    new_found = all_found = new_total = members = 0
    fresh = ~data.assortment
    for row, target in enumerate(data.eval_targets):
        ranked = with_discovery(scores[row], LIST, fresh)
        new = target[fresh[target]]
        all_found += int(np.isin(ranked, target).sum())
        if len(new):
            members += 1
            new_total += len(new)
            new_found += int(np.isin(ranked, new).sum())
    return {"recall@20": new_found / new_total if new_total else 0.0,
            "share": new_found / all_found if all_found else 0.0, "members": members, "items": new_total}
