"""`storefed serve` with the store-local layer (DESIGN §5.1, §5.2): the layer kept next to the
model and tied to its hash, and serving ranking exactly as the store's evaluation scores the
served model; without a layer, the global model."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from client.serving import layers as layer_store
from client.state.model_store import keep_model
from common.data.dataset import days_since_epoch
from common.evaluation.evaluation import member_scores, model_scores
from common.evaluation.metrics import top_k
from common.learning import local_layer as ll
from common.learning.layer_codec import LayerFileError, decode_layer, encode_layer
from model_fixtures import mixture_model as _model


@pytest.fixture(scope="module")
def fitted(small_store):
    model = _model(small_store)
    return model, ll.adapt(model, small_store)


def _chain_cut_at_evaluation(small_chain_dir, data, tmp_path):
    """A copy of the small chain, S001's receipts cut at its evaluation cut: (chain, S001's dir)."""
    chain = tmp_path / "chain"
    shutil.copytree(small_chain_dir, chain, ignore=shutil.ignore_patterns("state"))
    store = chain / "stores" / "S001"
    tx = pd.read_csv(store / "transactions.csv", dtype=str, keep_default_na=False)
    day = days_since_epoch(pd.to_datetime(tx["ts"]).dt.tz_localize("UTC"))
    tx[day < data.cut_day].to_csv(store / "transactions.csv", index=False)
    return chain, store


def test_the_layer_file_is_tied_to_its_model_and_refused_when_damaged(fitted, small_store, tmp_path):
    model, layer = fitted
    g = model_scores(model, small_store)
    h = ll.test_histories(small_store)
    back, meta = decode_layer(encode_layer(layer, {"model_hash": "a" * 64}))
    assert meta == {"model_hash": "a" * 64}
    np.testing.assert_array_equal(back.scores(g, h), layer.scores(g, h))
    assert layer.fitted_on > 0 and back.fitted_on == layer.fitted_on and back.valid_loss == layer.valid_loss

    keep = layer_store.keep_layer(tmp_path, layer, "a" * 64, "delivery")
    assert keep["model_hash"] == "a" * 64 and keep["fitted_on"] == layer.fitted_on
    assert layer_store.read_layer(tmp_path, "b" * 64) is None  # fitted on another model: never used with it
    other = ll.LocalLayer(layer.weights * 0.5, layer.item_bias, layer.store_pop, None, layer.tau_days, 3)
    layer_store.keep_layer(tmp_path, other, "b" * 64, "serve")
    # The new one is current; the one before stays findable (a rolled-back model finds its layer).
    assert layer_store.read_layer(tmp_path, "b" * 64)[0].fitted_on == 3
    assert layer_store.read_layer(tmp_path, "a" * 64)[1]["fitted_by"] == "delivery"
    assert (tmp_path / layer_store.PREV_LAYER_FILE).exists()

    bad = ll.LocalLayer(layer.weights.copy(), layer.item_bias, layer.store_pop, None, layer.tau_days)
    bad.weights[2] = np.nan
    with pytest.raises(LayerFileError, match="non-finite"):
        decode_layer(encode_layer(bad, {}))
    with pytest.raises(LayerFileError, match="not a store-local layer"):
        decode_layer(b"PK\x03\x04 torn")
    (tmp_path / layer_store.LAYER_FILE).write_bytes(b"torn")
    (tmp_path / layer_store.PREV_LAYER_FILE).write_bytes(b"torn")
    assert layer_store.read_layer(tmp_path, "a" * 64) is None  # damaged: fitted again, not served


def test_serving_ranks_as_the_evaluation_scores_the_served_model(fitted, small_chain_dir, small_store, tmp_path,
                                                                monkeypatch):
    """The store's data up to its evaluation cut, served: every evaluated member's top-k and every
    item's audience come from the same layer on the same model, with the evaluation's scores."""
    from client.serving import service as serving_module

    model, layer = fitted
    data = small_store
    chain, store = _chain_cut_at_evaluation(small_chain_dir, data, tmp_path)
    info = keep_model(store / "state", {k: v.numpy() for k, v in model.state_dict().items()}, run_id="r",
                      server_round=3, epsilon=1.0, final=True)
    layer_store.keep_layer(store / "state", layer, info["hash"], "delivery")

    serving = serving_module.StoreServing(store)
    assert serving.now_day == data.cut_day  # the same clock as the evaluation's histories
    assert serving.layer_info()["fitted_by"] == "delivery" and serving.layer_info()["model_hash"] == info["hash"]
    assert np.array_equal(np.isin(np.arange(data.items.n_items), serving.candidates), data.assortment)

    served = layer.scores(model_scores(model, data), ll.test_histories(data))
    ranked = top_k(served, 10, allowed=data.assortment)
    global_ranked = top_k(model_scores(model, data), 10, allowed=data.assortment)
    differs = 0
    for e, member in enumerate(data.eval_member_ids):
        got = serving.recommendations(str(member), 10)
        assert [i["item_id"] for i in got] == [str(x) for x in data.items.item_ids[ranked[e]]], member
        np.testing.assert_allclose([i["score"] for i in got], served[e, ranked[e]], atol=5e-4)
        bought = set(data.eval_history_items[e].tolist())
        assert [i["reason"] for i in got] == ["buy_again" if x in bought else "new_for_you" for x in ranked[e]]
        differs += not np.array_equal(ranked[e], global_ranked[e])
    assert differs > len(data.eval_member_ids) // 4  # the layer changes the lists: this is not the global model

    # Audience: the layer's scores of the item for every training member, as the evaluation's.
    audience = layer.scores(member_scores(model, data), ll.training_member_histories(data))
    for item in data.audience_items[:5]:
        answer = {m["member_id"]: m["score"] for m in serving.audience(str(data.items.item_ids[item]), 10_000)}
        assert set(answer) >= set(map(str, data.member_ids))
        np.testing.assert_allclose([answer[str(m)] for m in data.member_ids], audience[:, item], atol=5e-4)

    # A kept layer that does not fit this catalog (here: one item short) is not served.
    short = ll.LocalLayer(layer.weights, layer.item_bias[:-1], layer.store_pop[:-1], None, layer.tau_days, 5)
    layer_store.keep_layer(store / "state", short, info["hash"], "delivery")
    assert not serving._usable(short) and serving._usable(layer)

    # No layer for this model and none can be fitted: the global model alone, and it says so.

    def cannot(*_a, **_k):
        raise ValueError("too few baskets to fit")

    monkeypatch.setattr(serving_module, "adapt", cannot)
    alone = serving_module.StoreServing(store)
    assert alone.layer_info() is None and "being fitted" in alone.layer_error  # left to the watcher
    assert not alone.reload_model()  # the watcher's attempt
    assert alone.layer_info() is None and "too few baskets" in alone.layer_error and not alone.layer_pending
    g = model_scores(model, data)
    for e, member in enumerate(data.eval_member_ids[:20]):
        got = alone.recommendations(str(member), 10)
        assert [i["item_id"] for i in got] == [str(x) for x in data.items.item_ids[global_ranked[e]]]
        np.testing.assert_allclose([i["score"] for i in got], g[e, global_ranked[e]], atol=5e-4)


def test_a_stocked_item_never_sold_in_the_chain_takes_the_lists_discovery_place(fitted, small_chain_dir, small_store,
                                                                                 tmp_path):
    """Items in ``assortment.csv`` that no store has sold (DESIGN §5.2): a 10-list keeps its
    last place for the best of them by the member's own served score; the first 9 are the
    evaluation's ranking of the items sold here."""
    from client.serving import service as serving_module

    model, layer = fitted
    data = small_store
    chain, store = _chain_cut_at_evaluation(small_chain_dir, data, tmp_path)
    sold_anywhere = set()
    for other in (chain / "stores").iterdir():
        sold_anywhere |= set(pd.read_csv(other / "transactions.csv", dtype=str)["item_id"].str.strip())
    never = [str(i) for i in data.items.item_ids if str(i) not in sold_anywhere][:3]
    assert len(never) == 3, "the small chain's catalog has items no store sold"
    pd.DataFrame({"item_id": never}).to_csv(store / "assortment.csv", index=False)
    info = keep_model(store / "state", {k: v.numpy() for k, v in model.state_dict().items()}, run_id="r",
                      server_round=3, epsilon=1.0, final=True)
    layer_store.keep_layer(store / "state", layer, info["hash"], "delivery")

    serving = serving_module.StoreServing(store)
    served = layer.scores(model_scores(model, data), ll.test_histories(data))
    ranked = top_k(served, 9, allowed=data.assortment)
    # Each stocked item's score for every member, read through the audience answer.
    stocked = {item: {m["member_id"]: m["score"] for m in serving.audience(item, 10_000)} for item in never}
    for e, member in enumerate(data.eval_member_ids[:20]):
        got = serving.recommendations(str(member), 10)
        assert [i["item_id"] for i in got[:9]] == [str(x) for x in data.items.item_ids[ranked[e]]]
        best = max(never, key=lambda item: (stocked[item][str(member)], -never.index(item)))
        assert (got[9]["item_id"], got[9]["reason"]) == (best, "new_here")
        assert got[9]["score"] == pytest.approx(stocked[best][str(member)], abs=1e-6)
