"""POST /v1/audiences (DESIGN §5.4): calibrated campaign audiences at the store, in-process on
the small generated chain, and every refusal of a bad request."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from client.serving.api import create_api
from client.serving.service import StoreServing
from client.state.model_store import keep_model
from common.data import contract
from common.data.dataset import ItemIndex
from common.data.storefiles import read_catalog
from common.exchange import wire
from common.learning.model import ModelConfig, Recommender


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_chain_dir):
    chain = tmp_path_factory.mktemp("aud") / "chain"
    shutil.copytree(small_chain_dir, chain)
    store = chain / "stores" / "S001"
    torch.manual_seed(3)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain)), ModelConfig(dim=16, hidden=32))
    keep_model(store / "state", {k: v.numpy() for k, v in model.state_dict().items()}, run_id="r", server_round=1,
               epsilon=1.0, final=True)
    serving = StoreServing(store)
    return serving, TestClient(create_api(serving, watch_s=0, open_api=True))


def _items(serving, n=30):
    return [str(i) for i in serving.items.item_ids[np.argsort(-serving.counts)[:n]]]


def test_audience_lists_consenting_home_members_with_probabilities(served):
    serving, client = served
    r = client.post("/v1/audiences", json={"items": _items(serving) + ["no-such-item"], "objective": "buy", "k": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    members = body["members"]
    assert 0 < len(members) <= 20
    scores = [m["score"] for m in members]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    homes = serving.member_frame["home_store"]
    for m in members:
        assert m["member_id"] in serving.consenting
        assert contract.trains_here(homes.get(m["member_id"], ""), serving.store_id)
    assert body["unknown_items"] == 1 and body["unknown_items_first"] == ["no-such-item"]
    # Everything in the answer is listed in the registry of what a store sends (common/exchange/wire.py).
    assert set(body) <= set(wire.SERVE_AUDIENCE_KEYS)
    assert all(set(m) == set(wire.SERVE_AUDIENCE_MEMBER_KEYS) for m in members)
    cal = body["calibration"]
    assert cal["members"] == len(serving.member_ids) and 0 <= cal["positives"] <= cal["members"]


def test_candidates_restrict_and_members_without_consent_never_appear(served):
    serving, client = served
    refusing = [m for m in serving.known_members if m not in serving.consenting]
    some = [str(serving.member_ids[r]) for r in serving.home_rows[:5]]
    r = client.post("/v1/audiences", json={"items": _items(serving), "objective": "redeem", "k": 50,
                                           "candidates": some + refusing})
    assert r.status_code == 200, r.text
    listed = [m["member_id"] for m in r.json()["members"]]
    assert sorted(listed) == sorted(some)
    assert not set(listed) & set(refusing)


@pytest.mark.parametrize("body,words", [
    ({"items": ["x"], "objective": "click", "k": 5}, "objective must be"),
    ({"items": [], "objective": "buy", "k": 5}, "non-empty list"),
    ({"items": ["a", 3], "objective": "buy", "k": 5}, "non-empty list"),
    ({"items": ["a"], "objective": "buy", "k": 0}, "k must be"),
    ({"items": ["a"], "objective": "buy", "k": 1.5}, "k must be"),
    ({"items": ["a"], "objective": "buy", "k": 5, "store": "S2"}, "unknown field"),
    ({"items": ["a"], "objective": "buy", "candidates": "m1"}, "candidates must be"),
    ({"items": ["no-such-item"], "objective": "buy", "k": 5}, "none of the items"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_are_refused_with_a_reason(served, body, words):
    _, client = served
    r = client.post("/v1/audiences", json=body)
    assert r.status_code == 422
    text = json.dumps(r.json())
    assert words in text


def test_body_that_is_not_json(served):
    _, client = served
    r = client.post("/v1/audiences", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not JSON" in r.text
