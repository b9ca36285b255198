"""Serving math (common.learning.recommend), model files (weights, model_store), intake rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from client.state.model_store import keep_model, read_info, read_model
from common.data.ingest import validate_store
from common.learning import recommend
from model_fixtures import mixture_model
from common.learning.weights import ModelFileError, check_weights, decode_weights, encode_weights, weights_digest


@pytest.fixture
def model(small_store):
    return mixture_model(small_store)


def test_member_and_item_scores_equal_the_models_log_probabilities(small_store, model):
    ex = small_store.eval_examples
    rows = slice(0, 12)
    with torch.no_grad():
        logp = model(*(torch.as_tensor(a[rows]) for a in (ex.hist_items, ex.hist_feat, ex.hist_mask, ex.profile)))
    side = recommend.item_side({k: v.numpy() for k, v in model.state_dict().items()},
                               small_store.items.category, small_store.items.brand)
    states = recommend.encode_members(side, ex.hist_items[rows], ex.hist_feat[rows], ex.hist_mask[rows],
                                      ex.profile[rows])
    n = small_store.items.n_items
    everything = np.arange(n)
    for m in range(12):
        ours = recommend.scores_for_member(states, m, side.V, side.b, side.category, everything)
        np.testing.assert_allclose(ours, logp[m].numpy(), atol=2e-4)
    # The batch form the store-local layer re-scores: every item for several members at once.
    np.testing.assert_allclose(recommend.scores_for_members(states, np.arange(12), side.V, side.b, side.category), logp.numpy(),
                               atol=2e-4)
    for item in (0, int(ex.hist_items[0, 0]), n - 1):
        np.testing.assert_allclose(recommend.scores_for_item(states, side.V[item], side.b[item], int(side.category[item]), item),
                                   logp[:, item].numpy(), atol=2e-4)


def test_top_k_is_best_first_with_ties_by_index():
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0])
    assert recommend.top_k(scores, 3).tolist() == [1, 3, 2]
    assert recommend.top_k(scores, 10).tolist() == [1, 3, 2, 0, 4]
    # A NaN ranks last and drops nothing (fewer finite scores than k).
    assert recommend.top_k(np.array([1.0, np.nan, 2.0, np.nan]), 3).tolist() == [2, 0, 1]
    # Ties at the cut: the lower indices make it (a stable sort is the reference).
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = rng.integers(0, 3, rng.integers(1, 30)).astype(float)
        k = int(rng.integers(0, len(s) + 2))
        assert recommend.top_k(s, k).tolist() == np.argsort(-s, kind="stable")[:k].tolist()


def test_a_list_keeps_one_place_in_ten_for_items_new_to_the_store():
    scores = np.array([5, 4, 3, 2, 1, .5, .4, 9, .2, .1, 8, .05])
    new = np.zeros(12, bool)
    new[[7, 10]] = True  # the two best scores are new to the store
    assert recommend.discovery_slots(9) == 0 and recommend.discovery_slots(10) == 1
    assert recommend.discovery_slots(20) == 2
    # 10 places: the 9 best others, then the best new item (9 beats 8).
    assert recommend.with_discovery(scores, 10, new).tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 7]
    # 5 places: no discovery place; the new items compete by score.
    assert recommend.with_discovery(scores, 5, new).tolist() == [7, 10, 0, 1, 2]
    # One usual item only: it, the discovery place, then the best remaining new items.
    only = np.ones(12, bool)
    only[0] = False
    assert recommend.with_discovery(scores, 10, only).tolist() == [0, 7, 10, 1, 2, 3, 4, 5, 6, 8]
    # Nothing new: the plain top-k.
    assert recommend.with_discovery(scores, 10, np.zeros(12, bool)).tolist() == recommend.top_k(scores, 10).tolist()


def test_weights_hash_checks_and_file_roundtrip(model):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    shapes = {k: v.shape for k, v in state.items()}
    digest = weights_digest(state)
    assert digest == weights_digest({k: torch.from_numpy(v) for k, v in reversed(list(state.items()))})
    assert weights_digest(decode_weights(encode_weights(state), shapes)) == digest
    changed = dict(state, **{"item_out.bias": state["item_out.bias"] + 1e-3})
    assert weights_digest(changed) != digest
    with pytest.raises(ModelFileError, match="shape"):
        check_weights(dict(state, **{"item_out.bias": state["item_out.bias"][:-1]}), shapes)
    bad = state["gate.bias"].copy()
    bad[0] = np.nan
    with pytest.raises(ModelFileError, match="NaN"):
        check_weights(dict(state, **{"gate.bias": bad}), shapes)
    with pytest.raises(ModelFileError, match="missing"):
        check_weights({k: v for k, v in state.items() if k != "gate.bias"}, shapes)
    with pytest.raises(ModelFileError, match="not a readable"):
        decode_weights(b"not a model", shapes)


def test_a_store_keeps_the_previous_model_and_rejects_a_torn_one(tmp_path, model):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    shapes = {k: v.shape for k, v in state.items()}
    first = keep_model(tmp_path, state, run_id="run-1", server_round=3, epsilon=1.0, final=True)
    second_state = {k: v + 0.5 for k, v in state.items()}
    second = keep_model(tmp_path, second_state, run_id="run-2", server_round=4, epsilon=2.0, final=True)
    assert json.loads((tmp_path / "model.prev.json").read_text())["hash"] == first["hash"]
    weights, info = read_model(tmp_path, shapes)
    assert info == second and weights_digest(weights) == second["hash"] == weights_digest(second_state)
    # Weights that do not match the description (a delivery half-way) are refused.
    shutil.copy(tmp_path / "model.prev.pt", tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="hash differs"):
        read_model(tmp_path, shapes)
    assert read_info(tmp_path)["run_id"] == "run-2"


def _store(tmp_path, small_chain_dir, transactions: bytes):
    store = tmp_path / "S001"
    shutil.copytree(small_chain_dir / "stores" / "S001", store)
    (store / "transactions.csv").write_bytes(transactions)
    return store


def test_rows_with_too_few_or_too_many_fields_are_quarantined(tmp_path, small_chain_dir):
    src = (small_chain_dir / "stores" / "S001" / "transactions.csv").read_text().splitlines()
    header, rows = src[0], src[1:101]
    n_fields = header.count(",") + 1
    rows[10] = ",".join(rows[10].split(",")[:n_fields - 1])  # one field short
    rows[20] = rows[20] + ",extra"  # one field too many
    rows[30] = ",".join(rows[30].split(",")[:2])  # cut after two fields
    store = _store(tmp_path, small_chain_dir, ("\n".join([header] + rows)).encode())  # no final line end
    checked = validate_store(store, small_chain_dir, keep_data=False)
    report = checked.files["transactions"]
    assert report.rows_in == 100
    assert report.quarantined.get("too_few_fields") == 2 and report.quarantined.get("too_many_fields") == 1
    assert report.rows_in == report.accepted + sum(report.excluded.values()) + sum(report.quarantined.values())
    rows_named = sorted((p["row"], p["reason"]) for p in checked.problems if p["reason"].endswith("_fields"))
    assert rows_named == [(11, "too_few_fields"), (21, "too_many_fields"), (31, "too_few_fields")]
    assert any("last line has no line end" in w and "transactions.csv" in w for w in checked.warnings)
    # The same file with a final line end: no such warning.
    (store / "transactions.csv").write_bytes(("\n".join([header] + rows) + "\n").encode())
    assert not any("line end" in w for w in validate_store(store, small_chain_dir, keep_data=False).warnings)


def test_the_receipts_journal_is_read_as_transactions_under_the_same_rules(tmp_path, small_chain_dir):
    src = (small_chain_dir / "stores" / "S001" / "transactions.csv").read_text().splitlines()
    header, rows = src[0], src[1:51]
    store = _store(tmp_path, small_chain_dir, ("\n".join([header] + rows) + "\n").encode())
    base = validate_store(store, small_chain_dir, keep_data=False).files["transactions"]
    journal = tmp_path / "receipts.journal.csv"
    good = src[60:64]
    journal.write_text("\n".join([header] + good + ["R-x,2025-01-01"]))  # a torn last append
    checked = validate_store(store, small_chain_dir, keep_data=False, journal=journal)
    report = checked.files["transactions"]
    assert report.rows_in == 50 + 5
    assert report.quarantined.get("too_few_fields", 0) == base.quarantined.get("too_few_fields", 0) + 1
    assert report.rows_in == report.accepted + sum(report.excluded.values()) + sum(report.quarantined.values())
    assert any(p["file"] == str(journal) and p["row"] == 5 for p in checked.problems)
    assert any(str(journal) in w and "line end" in w for w in checked.warnings)
