"""Issue 17, items 2 and 3: nothing in the mechanism follows a store's exact size, and a
member who shops at several stores spends privacy at one of them.

The neighbour test builds a store and the same store with one training member removed
(their member row and receipts deleted) and compares what the mechanism uses and what the
train reply sends. The chain test writes ledgers by hand and recomputes each member's
chain-wide ε independently (concatenated ledgers, and dp-accounting's PLD as a cross-check).
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import store as store_mod
from client.client_app import handle_train
from client.state.ledger import append_event, read_events
from client.dp_round import dp_plan
from client.store import load_store
from common.config import RunConfig
from common.data.dataset import ItemIndex
from common.data.storefiles import DataError, read_catalog
from common.learning.model import Recommender
from common.privacy import accountant as privacy
from common.privacy.ledger import PrivacyEvent
from common.privacy.published_size import bucket, declared_size, size_warning


def test_bucket_rounds_up_to_the_r10_grid():
    # Hand-computed from 1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8 × 10^k (k ≥ 1).
    cases = {1: 10, 10: 10, 11: 13, 100: 100, 101: 125, 126: 160, 316: 400, 630: 630, 631: 800,
             1000: 1000, 1001: 1250, 3151: 4000}
    assert {n: bucket(n) for n in cases} == cases


def test_declared_size_node_config_first_and_bad_values_refused():
    assert declared_size({"published_size": 500}, {}) == (500, "store.json 'published_size'")
    assert declared_size({"published_size": 500}, {"published-size": 800})[0] == 800
    assert declared_size({}, {}) == (None, "")
    for bad in ("abc", float("nan"), float("inf"), 0, -3, 12.5, 10**10):
        with pytest.raises(ValueError, match="published_size"):
            declared_size({"published_size": bad}, {})


def test_size_warning_only_when_far_from_the_published_size():
    assert size_warning(500, 500) is None and size_warning(125, 500) is None
    assert "more than its published size" in size_warning(501, 500)
    assert "under a quarter" in size_warning(124, 500)


def _context(chain, node_config):
    cfg = {"data-dir": str(chain), "rounds": 2, "stores": 3}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg)


def _message(chain):
    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


@pytest.mark.usefixtures("task_identity")
def test_the_mechanism_is_the_same_for_a_store_and_its_neighbour(small_chain_dir, tmp_path):
    stores = tmp_path / "chain" / "stores"
    shutil.copytree(small_chain_dir, tmp_path / "chain")
    chain = tmp_path / "chain"
    shutil.copytree(stores / "S001", stores / "S009")
    (stores / "S009" / "store.json").write_text(json.dumps({
        **json.loads((stores / "S001" / "store.json").read_text()), "store_id": "S009"}))
    full = load_store({"store-dir": str(stores / "S001"), "catalog": str(chain)}, RunConfig.from_mapping({}))
    gone = str(full.data.member_ids[0])  # a member who trains at S001
    for name in ("members.csv", "transactions.csv"):
        frame = pd.read_csv(stores / "S009" / name, dtype=str, keep_default_na=False)
        if "home_store" in frame:
            frame["home_store"] = frame["home_store"].replace("S001", "S009")
        frame[frame["member_id"] != gone].to_csv(stores / "S009" / name, index=False)

    replies, plans, sizes = [], [], []
    for sid in ("S001", "S009"):
        node_config = {"store-dir": str(stores / sid), "catalog": str(chain), "state-dir": str(tmp_path / sid)}
        context = _context(chain, node_config)
        cfg = RunConfig.from_mapping(context.run_config)
        node = load_store(node_config, cfg)
        sizes.append(node.data.n_train_members)
        plans.append(dp_plan(node, cfg))
        reply = handle_train(_message(chain), context, cfg)
        replies.append(dict(reply.content["metrics"]))
    assert sizes[0] == sizes[1] + 1, "the neighbour must have exactly one training member fewer"
    # q, steps, σ, divisor, δ and the FedAvg weight: identical, exactly.
    assert plans[0] == plans[1]
    assert plans[0].weight == plans[0].published_size == json.loads((stores / "S001" / "store.json").read_text())[
        "published_size"] != sizes[0]
    # What leaves the store (the deployed reply: no loss) is identical too.
    assert replies[0] == replies[1]
    assert replies[0]["num-examples"] == plans[0].weight
    # ... and the ledger records the same mechanism at both.
    events = [read_events(tmp_path / sid, sid)[0] for sid in ("S001", "S009")]
    assert events[0].mechanism() == events[1].mechanism() == (plans[0].noise_multiplier, plans[0].sample_rate,
                                                              plans[0].steps)


def test_a_deployed_store_without_a_published_size_does_not_train(small_chain_dir, tmp_path):
    shutil.copytree(small_chain_dir / "stores" / "S002", tmp_path / "S002")
    meta = json.loads((tmp_path / "S002" / "store.json").read_text())
    del meta["published_size"]
    (tmp_path / "S002" / "store.json").write_text(json.dumps(meta))
    cfg = RunConfig.from_mapping({})
    node = load_store({"store-dir": str(tmp_path / "S002"), "catalog": str(small_chain_dir)}, cfg)
    with pytest.raises(DataError, match="store.json: no 'published_size'") as err:
        dp_plan(node, cfg)
    # The refusal's reason leaves the store: it must not carry the count or its bucket.
    assert str(node.data.n_train_members) not in str(err.value)
    assert str(bucket(node.data.n_train_members)) not in str(err.value)


def test_members_train_only_at_their_home_store(small_chain_dir):
    cfg = RunConfig.from_mapping({"data-dir": str(small_chain_dir), "stores": 3})
    trained: dict[str, int] = {}
    elsewhere = 0
    for part in range(3):
        node = load_store({"partition-id": part, "num-partitions": 3}, cfg)
        members = pd.read_csv(node.store_dir / "members.csv", dtype=str, keep_default_na=False)
        home = members.set_index("member_id")["home_store"]
        assert (home.reindex(node.data.member_ids) == node.store_id).all()
        elsewhere += node.data.accounting["members_homed_elsewhere"]
        for m in node.data.member_ids:
            trained[m] = trained.get(m, 0) + 1
    assert elsewhere > 0, "the test needs members who shop at a second store"
    assert max(trained.values()) == 1


def _write_ledgers(state, mechanisms, delta):
    for sid, mechs in mechanisms.items():
        for i, (s, q, t) in enumerate(mechs):
            append_event(state / sid, sid, PrivacyEvent(run_id="r", round=i + 1, noise_multiplier=s, sample_rate=q,
                                                        steps=t, clip_norm=1.0, accountant="prv",
                                                        at="2026-01-01T00:00:00+00:00", delta=delta))


def test_member_privacy_composes_each_members_ledgers(small_chain_dir, tmp_path, monkeypatch):
    from simulations.bench.privacy import pld_epsilon
    from simulations.simulate import chain_member_privacy

    monkeypatch.setenv("STOREFED_PREPARED_DIR", str(tmp_path / "prepared"))
    chain = tmp_path / "chain"
    shutil.copytree(small_chain_dir, chain)
    state = tmp_path / "state"
    delta = 1e-6
    mechanisms = {"S001": [(1.2, 0.25, 4)] * 3, "S002": [(1.6, 0.5, 2)] * 2, "S003": []}
    _write_ledgers(state, mechanisms, delta)
    cfg = RunConfig.from_mapping({"data-dir": str(chain), "stores": 3, "state-dir": str(state)})
    registered = pd.concat([pd.read_csv(chain / "stores" / s / "members.csv", dtype=str)["member_id"]
                            for s in ("S001", "S002", "S003")]).value_counts()

    home = chain_member_privacy(cfg)
    eps = {sid: privacy.epsilon([e.mechanism() for e in read_events(state / sid, sid)], delta) for sid in mechanisms}
    assert home["members_at_several_stores"] == int((registered > 1).sum()) > 0
    assert home["members_trained_at_several_stores"] == 0
    assert home["max_epsilon"] == pytest.approx(max(eps.values()), rel=1e-12)
    assert home["max_epsilon"] <= home["budget"] == 8.0

    # Without home stores, a member at S001 and S002 trains at both: ε of both ledgers.
    for sid in ("S001", "S002", "S003"):
        path = chain / "stores" / sid / "members.csv"
        pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns="home_store").to_csv(path, index=False)
    store_mod._CACHE.clear()
    both = chain_member_privacy(cfg)
    history = [e.mechanism() for sid in ("S001", "S002") for e in read_events(state / sid, sid)]
    assert both["members_trained_at_several_stores"] > 0
    assert both["max_epsilon_stores"] == ["S001", "S002"]
    assert both["max_epsilon"] == pytest.approx(privacy.epsilon(history, delta), rel=1e-12)
    assert both["max_epsilon"] == pytest.approx(pld_epsilon(history, delta), rel=0.05)
    assert both["max_epsilon"] > max(eps.values())


def test_validate_reports_the_published_size_and_warns_without_one(small_chain_dir, tmp_path):
    from common.data.ingest import validate_store

    shutil.copytree(small_chain_dir / "stores" / "S001", tmp_path / "S001")
    checked = validate_store(tmp_path / "S001", small_chain_dir, keep_data=True)
    size = checked.as_dict()["size"]
    home = checked.members.set_index("member_id")["home_store"]
    trainable = pd.unique(checked.lines["member"])
    expected = int((home.reindex(trainable) == "S001").sum())
    assert size["members_who_can_train"] == expected > 0
    assert size["published_size"] == json.loads((tmp_path / "S001" / "store.json").read_text())["published_size"]
    assert size["suggested_published_size"] == bucket(expected)
    assert not any("published_size" in w or "home_store" in w for w in checked.warnings)

    (tmp_path / "S001" / "store.json").write_text(json.dumps({"store_id": "S001"}))
    path = tmp_path / "S001" / "members.csv"
    pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns="home_store").to_csv(path, index=False)
    checked = validate_store(tmp_path / "S001", small_chain_dir, keep_data=False)
    assert any("no 'published_size'" in w and f'"published_size": {bucket(checked.size["members_who_can_train"])}' in w
               for w in checked.warnings)
    assert any("no 'home_store' column" in w for w in checked.warnings)


def test_a_store_with_no_member_to_train_still_takes_every_noisy_step(small_store):
    import dataclasses

    import numpy as np

    from common.learning.training import DPConfig, TrainConfig, train_local

    empty = dataclasses.replace(small_store, member_ids=np.array([], dtype=object),
                                profile=small_store.profile[:0])
    torch.manual_seed(0)
    model = Recommender(small_store.items)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result = train_local(model, empty, TrainConfig(batch_size=128, optimizer="sgd", lr=1.0, seed=1),
                         DPConfig(noise_multiplier=1.0, clip_norm=1.0, published_size=500))
    # 500 published, batch 128: q = 1/4, 4 steps, each adding N(0, 1) / 125 per coordinate.
    assert (result.steps, result.sample_rate) == (4, 0.25)
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    assert moved.std().item() == pytest.approx(2.0 / 125, rel=0.05)
