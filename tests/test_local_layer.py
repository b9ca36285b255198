"""The store-local layer (DESIGN §5.1): its arithmetic, its fit, and that it never reaches a train reply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common.config import RunConfig
from common.data.dataset import ItemIndex
from common.data.storefiles import read_catalog
from common.evaluation.evaluation import evaluate_scores, model_scores
from common.learning import local_layer as ll
from common.learning.model import Recommender


def test_scores_are_the_blend_written_out_by_hand():
    w = np.zeros(ll.N_FEATURES)
    w[:8] = [0.5, 0.3, 0.0, 1.0, 0.7, 0.2, -0.4, 0.1]
    w[ll.FEATURES.index("repeat_ratio")] = 0.6
    w[ll.FEATURES.index("category")] = 0.8
    bias = np.array([0.0, 0.05, -0.1, 0.2])
    pop = ll.store_pop_feature(np.array([9.0, 3.0, 0.0, 1.0]))
    groups = np.array([0, 1, 1, 0])
    share = np.array([0.5, 0.5])
    layer = ll.LocalLayer(w, bias, pop, None, tau_days=10.0, item_category=groups, category_share=share,
                          group_pseudo=2.0)
    g = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    hist = ll.Histories([np.array([1, 3]), np.array([], dtype=np.int64)], [np.array([2.0, 1.0]), np.array([])],
                        [np.array([95.0, 80.0]), np.array([])], at_day=100.0)
    got = layer.scores(g, hist)
    # Member 0 bought 2 receipts of item 1 (group 1) and 1 of item 3 (group 0): lift of group 1
    # = (2 + 2·0.5) / ((3 + 2)·0.5), of group 0 = (1 + 1) / 2.5; member 1 has no history: 0.
    lift = np.array([[np.log(2 / 2.5), np.log(3 / 2.5), np.log(3 / 2.5), np.log(2 / 2.5)], [0.0] * 4])
    expect = 0.5 * g + 0.3 * pop[None, :] + bias[None, :] + 0.8 * lift
    ratio = (3.0 - 2.0 + 0.5 * 2.0) / (3.0 + 2.0)  # 1 rebuy in 3 lines, 2 pseudo-lines at 1/2
    for item, count, last in ((1, 2.0, 95.0), (3, 1.0, 80.0)):
        expect[0, item] += (1.0 + 0.7 * np.log1p(count) + 0.2 * np.exp(-(100.0 - last) / 10.0)
                            - 0.4 * g[0, item] + 0.1 * pop[item] + 0.6 * np.log(ratio / (1 - ratio))
                            - 0.8 * lift[0, item])  # own items: ranked by the own-history block alone
    assert pop[0] == 0.0 and pop[2] == -np.log(10.0)
    np.testing.assert_allclose(got, expect, rtol=1e-6)  # served in float32


def test_store_pop_spreads_its_pseudo_count_by_the_model_popularity():
    counts = np.array([9.0, 0.0, 0.0, 3.0])
    prior = np.array([0.1, 0.6, 0.1, 0.2])  # 4 pseudo-units: 0.4, 2.4, 0.4, 0.8
    f = ll.store_pop_feature(counts, prior)
    np.testing.assert_allclose(f, np.log([9.4, 2.4, 0.4, 3.8]) - np.log(9.4))
    assert f[1] > f[2]  # two unsold items: the one the model likes ranks first
    np.testing.assert_allclose(ll.store_pop_feature(counts, np.full(4, 0.25)), ll.store_pop_feature(counts))


def test_ease_is_the_closed_form_ridge_regression():
    h = ll.Histories([np.array([0, 1]), np.array([1, 2]), np.array([0, 1, 2]), np.array([3])],
                     [np.ones(2), np.ones(2), np.ones(3), np.ones(1)], [np.zeros(2), np.zeros(2), np.zeros(3),
                                                                         np.zeros(1)], 1.0)
    items, b = ll.ease_matrix(h, 5, l2=2.0)
    assert items.tolist() == [0, 1, 2, 3]  # item 4: bought by no one, not scored
    x = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], float)
    # B solves min ‖X − XB‖² + λ‖B‖² with diag(B) = 0: each column j is a ridge regression of
    # x_j on the other columns (hand-check column 0 that way).
    others = [1, 2, 3]
    a = x[:, others]
    col0 = np.linalg.solve(a.T @ a + 2.0 * np.eye(3), a.T @ x[:, 0])
    np.testing.assert_allclose(b[others, 0], col0, atol=1e-12)
    assert np.all(np.diag(b) == 0)
    side = ll.StoreSide(ease_items=items, ease=b)
    feats = ll._features(ll.Histories([np.array([1, 3])], [np.ones(2)], [np.zeros(2)], 1.0), side, 30.0, 5)
    np.testing.assert_allclose(feats["ease"][0].numpy(), [*(b[1] + b[3]), 0.0])


def test_group_lift_is_the_smoothed_share_over_the_store_share():
    groups = np.array([0, 0, 1, 2])
    share = ll.group_shares(groups, 3, np.array([5.0, 3.0, 2.0, 0.0]))
    np.testing.assert_allclose(share, [9 / 13, 3 / 13, 1 / 13])  # one pseudo-unit per group
    h = ll.Histories([np.array([2, 3]), np.array([], dtype=np.int64)], [np.array([3.0, 1.0]), np.array([])],
                     [np.zeros(2), np.zeros(0)], 1.0)
    lift = ll._group_lift(h, groups, share, pseudo=5.0)
    n = np.array([0.0, 3.0, 1.0])
    expect0 = np.log((n + 5 * share) / ((4 + 5) * share))
    np.testing.assert_allclose(lift[0], expect0[groups])
    np.testing.assert_allclose(lift[1], 0.0, atol=1e-12)  # no history: no lift


def _recency_world(rng, members=300, items=30):
    """Members rebuy exactly their most recent item; the global model knows nothing (uniform)."""
    hist, targets = [], []
    for _ in range(members):
        own = rng.choice(items, size=4, replace=False)
        last = rng.permutation(np.arange(1.0, 5.0)) * 10.0  # days 10..40
        hist.append((np.sort(own), last[np.argsort(own)]))
        targets.append(np.array([own[np.argmax(last)]]))
    h = ll.Histories([i for i, _ in hist], [np.ones(4) for _ in hist], [d for _, d in hist], at_day=41.0)
    return np.full((members, items), -np.log(items)), h, targets


def test_the_fit_learns_what_the_store_data_says_and_lowers_the_validation_loss(rng):
    g, h, targets = _recency_world(rng)
    layer = ll.fit(g, h, targets, np.ones(30), np.ones(30, bool), None)
    assert layer.valid_loss["fitted"] < layer.valid_loss["prior"] - 1.0
    assert layer.weights[ll.FEATURES.index("recency")] > 1.0  # the most recent item wins
    ranked = np.argsort(-layer.scores(g, h), axis=1)[:, 0]
    assert np.mean(ranked == np.concatenate(targets)) > 0.95
    assert layer.weights[ll.FEATURES.index("item_knn")] == 0.0  # not an active feature by default
    assert layer.weights[ll.FEATURES.index("ease")] == 0.0


def test_no_rankable_target_leaves_the_global_model_alone(rng):
    g, h, targets = _recency_world(rng, members=5)
    assortment = np.ones(30, bool)
    assortment[[t[0] for t in targets]] = False  # every target item unsold at the store
    layer = ll.fit(g, h, targets, np.ones(30), assortment, None)
    np.testing.assert_array_equal(layer.weights, ll.PRIOR)
    assert layer.fitted_on == 0


def test_validation_split_uses_only_the_training_period(small_store):
    ex, hist, targets, everyone = ll.validation_split(small_store, 28)
    v_cut = small_store.cut_day - 28
    assert len(ex) == len(targets) == len(hist) > 0 and len(everyone) == small_store.n_train_members
    assert hist.at_day == v_cut
    log = small_store.train_log
    assert log.receipt_day.max() < small_store.cut_day  # the test period is not in the log at all
    for last in hist.last_day:
        assert (last < v_cut).all()


def test_adapt_on_a_real_store_beats_or_matches_the_global_model_on_validation(small_store):
    torch.manual_seed(0)
    model = Recommender(small_store.items)
    layer = ll.adapt(model, small_store)
    assert layer.fitted_on > 0 and layer.valid_loss["fitted"] <= layer.valid_loss["prior"]
    served = layer.scores(model_scores(model, small_store), ll.test_histories(small_store))
    assert served.shape == (len(small_store.eval_member_ids), small_store.items.n_items)
    # An untrained global model: the layer, fitted on the store's own data, must do better on test.
    assert evaluate_scores(served, small_store)["ndcg@10"] > evaluate_scores(model_scores(model, small_store),
                                                                             small_store)["ndcg@10"]


# --- the store glue: the layer never reaches what a store sends ---------------------------------

def _context(chain_dir, state_dir, **run):
    cfg = {"data-dir": str(chain_dir), "rounds": 2, "stores": 3, **run}
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3,
                                                     "state-dir": str(state_dir)}, state=RecordDict(), run_config=cfg)


def _message(chain_dir, kind, server_round):
    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=7, message_type=kind)


@pytest.mark.usefixtures("task_identity")
def test_train_reply_is_bit_identical_with_or_without_a_local_layer(small_chain_dir, tmp_path):
    from client.serving import layers as store_layer
    from client.client_app import handle_evaluate, handle_train

    def train(state, **run):
        ctx = _context(small_chain_dir, tmp_path / state, **run)
        return handle_train(_message(small_chain_dir, MessageType.TRAIN, 2), ctx, RunConfig.from_mapping(ctx.run_config))

    store_layer._CACHE.clear()
    without = train("a", **{"local-layer": False})
    assert not store_layer._CACHE
    ctx = _context(small_chain_dir, tmp_path / "b")
    evaluated = handle_evaluate(_message(small_chain_dir, MessageType.EVALUATE, 2), ctx,
                                RunConfig.from_mapping(ctx.run_config))
    assert len(store_layer._CACHE) == 1  # the store now holds a fitted layer
    from client.serving.layers import keep_layer  # ... in its process, and as the file serving reads

    keep_layer(tmp_path / "c", next(iter(store_layer._CACHE.values()))[1], "f" * 64, "delivery")
    with_layer = train("c")
    a = without.content["arrays"].to_torch_state_dict()
    b = with_layer.content["arrays"].to_torch_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert dict(without.content["metrics"]) == dict(with_layer.content["metrics"])
    # The served model (with the layer) and the global model are reported side by side.
    m = evaluated.content["metrics"]
    (_, layer), = store_layer._CACHE.values()
    from client.store import load_store

    data = load_store(ctx.node_config, RunConfig.from_mapping(ctx.run_config)).data
    model = Recommender(data.items)
    model.load_state_dict(_message(small_chain_dir, MessageType.EVALUATE, 2).content["arrays"].to_torch_state_dict())
    global_scores = model_scores(model, data)
    assert m["global_model.ndcg@10"] == pytest.approx(evaluate_scores(global_scores, data)["ndcg@10"], abs=1e-9)
    assert m["ndcg@10"] == pytest.approx(evaluate_scores(layer.scores(global_scores, ll.test_histories(data)),
                                                         data)["ndcg@10"], abs=1e-9)
    assert m["ndcg@10"] != m["global_model.ndcg@10"]


def test_reach_counts_buyers_not_units_and_scores_only_new_items():
    h = ll.Histories([np.array([0, 1]), np.array([0]), np.array([0, 2])], [np.array([9.0, 1.0]), np.ones(1),
                                                                           np.ones(2)],
                     [np.zeros(2), np.zeros(1), np.zeros(2)], 1.0)
    reach = ll.reach_feature(h, 4)
    np.testing.assert_allclose(reach, np.log1p([3.0, 1.0, 1.0, 0.0]) - np.log(4.0))  # 9 units of item 0 count once
    w = np.zeros(ll.N_FEATURES)
    w[ll.FEATURES.index("reach")] = 2.0
    layer = ll.LocalLayer(w, np.zeros(4), np.zeros(4), None, 30.0, reach=reach)
    got = layer.scores(np.zeros((1, 4)), ll.Histories([np.array([1])], [np.ones(1)], [np.zeros(1)], 1.0))
    np.testing.assert_allclose(got[0], [2 * reach[0], 0.0, 2 * reach[2], 2 * reach[3]], rtol=1e-6)  # item 1: own


def test_a_layer_with_every_term_survives_the_layer_file():
    from common.learning.layer_codec import decode_layer, encode_layer

    h = ll.Histories([np.array([0, 1]), np.array([1, 2])], [np.array([2.0, 1.0]), np.ones(2)],
                     [np.array([5.0, 9.0]), np.array([8.0, 9.0])], 10.0)
    items = ItemIndex(np.array(["a", "b", "c", "d"]), np.array([0, 0, 1, 1]), np.array([0, 1, 2, 2]), 2, 3)
    cfg = ll.LocalConfig(features=ll.FEATURES)
    side = ll.store_side(h, items, np.array([3.0, 4.0, 1.0, 0.0]), cfg)
    w = np.linspace(0.1, 1.2, ll.N_FEATURES)
    layer = ll.LocalLayer(w, np.zeros(4), ll.store_pop_feature(np.array([3.0, 4.0, 1.0, 0.0])), None, 30.0)
    layer.set_side(side)
    back, meta = decode_layer(encode_layer(layer, {"model": "x"}))
    g = np.log(np.full((2, 4), 0.25))
    np.testing.assert_array_equal(back.scores(g, h), layer.scores(g, h))
    assert meta == {"model": "x"} and back.ease is not None and back.reach is not None


def test_fit_rows_spread_evenly_and_subset_examples():
    from common.data.dataset import Examples
    from common.learning.local_layer import fit_rows, subset_examples

    assert fit_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    # linspace(0, 9, 4) = 0, 3, 6, 9 by hand
    assert fit_rows(10, 4).tolist() == [0, 3, 6, 9]
    ex = Examples(np.arange(10).reshape(5, 2), np.zeros((5, 2, 1)), np.ones((5, 2)), np.arange(5)[:, None] * 1.0,
                  np.arange(5)[:, None] + 10, np.ones((5, 1)))
    sub = subset_examples(ex, np.array([1, 4]))
    assert sub.hist_items.tolist() == [[2, 3], [8, 9]]
    assert sub.target_items.tolist() == [[11], [14]]
    assert len(sub) == 2
