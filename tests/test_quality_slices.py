"""TIFU-KNN, the validation split and the cold-start slices, against hand-computed values."""

from __future__ import annotations


import numpy as np
import pytest

from common.data.dataset import MemberLog
from common.data import holdout
from common.evaluation import slices
from simulations.bench import baselines as tifu


def _log():
    # Member 0: baskets {0,1} day 1, {1} day 2, {2} day 3, {1,3} day 4; member 1: {3} day 2.
    baskets = [[0, 1], [1], [2], [1, 3], [3]]
    return MemberLog(receipt_ptr=np.array([0, 4, 5]), receipt_day=np.array([1.0, 2.0, 3.0, 4.0, 2.0]),
                     line_ptr=np.cumsum([0] + [len(b) for b in baskets]),
                     line_item=np.concatenate(baskets), line_qty=np.ones(7, np.float32))


def test_tifu_member_vector_is_the_papers_hierarchical_decay_by_hand():
    cfg = tifu.TifuConfig(group_size=3, r_b=0.5, r_g=0.5)
    u = tifu.member_vectors(_log(), np.array([4, 1]), 5, cfg)
    # Two groups: [b0] and [b1 b2 b3]. b0: r_g/2 · 1 = 1/4; b1..b3: 1/2 · (r_b², r_b, 1)/3.
    w = [0.25, 1 / 24, 1 / 12, 1 / 6]
    np.testing.assert_allclose(u[0], [w[0], w[0] + w[1] + w[3], w[2], w[3], 0.0], rtol=1e-6)
    np.testing.assert_allclose(u[1], [0, 0, 0, 1.0, 0], rtol=1e-6)  # one group of one basket
    assert not tifu.member_vectors(_log(), np.array([0, 0]), 5, cfg).any()


def test_tifu_neighbours_and_blend():
    pool = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], np.float32)
    nb = tifu.nearest(pool, pool, 1, exclude=np.array([0, 1, 2]))
    assert nb[:, 0].tolist() == [1, 0, 1]  # nearest other member, never oneself
    pred = tifu.predict(pool, pool, nb, tifu.TifuConfig(alpha=0.7, n_neighbors=1))
    np.testing.assert_allclose(pred[2], 0.7 * pool[2] + 0.3 * pool[1], rtol=1e-6)


def test_truncated_keeps_only_receipts_before_the_day(small_store):
    day = small_store.cut_day - 28
    before = holdout.truncated(small_store, day)
    assert before.train_log.receipt_day.max() < day
    upto = holdout.receipts_before(small_store.train_log, day)
    assert before.n_train_members == int((upto > 0).sum())
    assert before.train_log.n_receipts().sum() == upto.sum()
    # The first kept member's lines are the original member's first lines.
    m = int(np.flatnonzero(upto > 0)[0])
    log = small_store.train_log
    n_lines = log.line_ptr[log.receipt_ptr[m] + upto[m]] - log.line_ptr[log.receipt_ptr[m]]
    np.testing.assert_array_equal(before.train_log.line_item[:n_lines],
                                  log.line_item[log.line_ptr[log.receipt_ptr[m]]:][:n_lines])


def test_cold_and_new_item_slices_by_hand(small_store):
    d = small_store
    n = len(d.eval_member_ids)
    receipts = slices.receipts_before_cut(d)
    cold = np.flatnonzero(receipts <= 2)
    assert len(cold) > 0
    # A scoring that puts each member's own targets first: perfect on every slice.
    oracle = np.zeros((n, d.items.n_items))
    for row, t in enumerate(d.eval_targets):
        oracle[row, t] = 1.0
    c = slices.cold_slice(oracle, d)
    assert c["members"] == len(cold)
    # Each member's first target is made new to the store, so the discovery places are tested.
    import dataclasses

    unsold = np.unique([t[0] for t in d.eval_targets if len(t)])
    d = dataclasses.replace(d, assortment=d.assortment & ~np.isin(np.arange(d.items.n_items), unsold))
    new = slices.new_item_slice(oracle, d)
    new_total = sum(int((~d.assortment[t]).sum()) for t in d.eval_targets)
    assert new["items"] == new_total
    # The oracle's 20-list: 18 places for sold items, where its own sold targets come first,
    # then 2 discovery places, where its new targets come first.
    assert d.assortment.sum() >= 18 and (~d.assortment).sum() >= 2
    olds = [int(d.assortment[t].sum()) for t in d.eval_targets]
    news = [int((~d.assortment[t]).sum()) for t in d.eval_targets]
    found_new = sum(min(2, x) for x in news)
    found_all = sum(min(18, o) + min(2, x) for o, x in zip(olds, news))
    assert found_new > 0  # the fixture has new targets: the discovery places find them
    assert new["recall@20"] == pytest.approx(found_new / new_total if new_total else 0.0)
    assert new["share"] == pytest.approx(found_new / found_all)


def _popularity_store(store, sold: int, targets):
    """``store`` with items 0..sold−1 sold (counts sold, sold−1, …, 1), nothing else, and
    two evaluated members with the given targets."""
    import dataclasses

    counts = np.zeros(store.items.n_items)
    counts[:sold] = np.arange(sold, 0, -1)
    return dataclasses.replace(store, store_counts=counts, assortment=counts > 0,
                               eval_member_ids=store.eval_member_ids[:2], eval_targets=[np.array(t) for t in targets])


def test_store_popularity_on_the_new_item_slice_by_hand(small_store):
    # 25 items sold: the top 20 by store counts are items 0..19, all sold; the new targets
    # 30 and 40 are not in them: nothing new is found.
    # The list: sold items 0..17, then the 2 discovery places, the unsold 25 and 26 (all
    # score 0; ties to the lower index).
    d = _popularity_store(small_store, 25, [[0, 30], [3, 40]])
    assert slices.new_item_slice(d.store_counts[None, :], d) == {"recall@20": 0.0, "share": 0.0, "members": 2, "items": 2}
    # Targets 25 and 26 take the discovery places; 20 (sold, 21st by count) is not listed.
    d = _popularity_store(small_store, 25, [[0, 25], [20, 26]])
    assert slices.new_item_slice(d.store_counts[None, :], d) == {"recall@20": 1.0, "share": 2 / 3, "members": 2,
                                                                  "items": 2}
    # 5 items sold: 0..4, then the discovery places 5 and 6, then the unsold 7..19 fill the list.
    # Member 0 ([0, 7, 30]) finds 0 and 7, new 7 and 30: one of two; member 1 ([1, 3, 25])
    # finds 1 and 3, new 25 not found. Recall 1/3 of the new items; share 1 new of 4 found.
    d = _popularity_store(small_store, 5, [[0, 7, 30], [1, 3, 25]])
    got = slices.new_item_slice(d.store_counts[None, :], d)
    assert (got["members"], got["items"]) == (2, 3)
    assert got["recall@20"] == pytest.approx(1 / 3, rel=1e-12) and got["share"] == pytest.approx(1 / 4, rel=1e-12)


def test_pooled_training_refreshes_the_item_snapshot_every_epoch(small_store):
    """The centralized reference's old bug: its encoder read the initial item vectors for good."""
    import torch

    from common.learning.model import Recommender
    from common.learning.training import TrainConfig, train_pooled

    torch.manual_seed(0)
    model = Recommender(small_store.items)
    initial = model.item_vectors().clone()
    seen = {}

    def on_epoch(epoch, m):
        seen[epoch] = (m.item_snapshot.clone(), m.item_vectors().clone())
        return epoch >= 2

    train_pooled(model, [small_store], TrainConfig(local_epochs=5, batch_size=256, lr=0.01), on_epoch)
    assert sorted(seen) == [1, 2]  # early stopping at the callback's word
    assert torch.equal(seen[1][0], initial)  # epoch 1 read the initial vectors …
    assert torch.equal(seen[2][0], seen[1][1])  # … epoch 2 the vectors trained in epoch 1
    assert not torch.equal(seen[2][0], initial)
