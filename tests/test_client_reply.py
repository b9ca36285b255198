"""What a store's replies actually contain: only the values DESIGN §4.3 lists (common.exchange.wire)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import handle_evaluate, handle_train
from common.exchange import wire
from common.config import RunConfig
from common.data.dataset import ItemIndex
from common.learning.model import Recommender
from common.data.storefiles import read_catalog


pytestmark = pytest.mark.usefixtures("task_identity")


def _context(chain_dir, node_config):
    cfg = {"data-dir": str(chain_dir), "rounds": 2, "stores": 3}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg)


def _message(chain_dir, kind):
    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _keys(reply):
    arrays = set(reply.content.array_records)
    metrics = {k for rec in reply.content.metric_records.values() for k in rec}
    configs = {k for rec in reply.content.config_records.values() for k in rec}
    return arrays, metrics, configs


def _records(reply) -> dict[str, str]:
    """Each record of the reply by name, with its kind: nothing else may ride along."""
    content = reply.content
    kinds = {**{k: "arrays" for k in content.array_records}, **{k: "metrics" for k in content.metric_records},
             **{k: "config" for k in content.config_records}}
    assert set(kinds) == set(content), "a record of another kind"
    return kinds


# What may leave a store, written out here as literals (DESIGN §4.3): a value added to the
# wire lists without this file changing fails the pinning test below.
METRICS = ("ndcg@10", "recall@10", "hit@10", "map@10", "ndcg@20", "recall@20", "hit@20", "map@20")
TRAIN_METRICS = ("num-examples", "epsilon", "delta", "noise-multiplier", "rounds-trained", "epsilon-budget", "train-loss")
TRAIN_CONFIG = ("store-id", "accountant")
AUDIENCE_METRICS = ("audience.auc", "audience.recall@100", "audience_pop.auc", "audience_pop.recall@100")
EVAL_METRICS = ("num-examples", *METRICS, *(f"global_model.{m}" for m in METRICS),
                *(f"store_pop.{m}" for m in METRICS), *(f"p_topfreq.{m}" for m in METRICS), *AUDIENCE_METRICS)
EVAL_CONFIG = ("store-id",)
MODEL_ACK_CONFIG = ("store-id", "model-hash")
DECLINE_KEYS = ("store-id", "epsilon", "epsilon-after", "epsilon-budget", "delta", "accountant", "reason")
REFUSE_KEYS = ("store-id", "reason")


def test_the_wire_lists_are_exactly_the_designed_values():
    assert wire.TRAIN_ARRAYS == "arrays"
    assert wire.TRAIN_METRICS == TRAIN_METRICS and wire.TRAIN_CONFIG == TRAIN_CONFIG
    assert wire.EVAL_METRICS == EVAL_METRICS and len(EVAL_METRICS) == 1 + 4 * 8 + 4
    assert wire.EVAL_CONFIG == EVAL_CONFIG and wire.AUDIENCE_METRICS == AUDIENCE_METRICS
    assert wire.MODEL_ACK_CONFIG == MODEL_ACK_CONFIG and wire.MODEL_MESSAGE == "query.model"
    assert wire.DECLINE_KEYS == DECLINE_KEYS and wire.REFUSE_KEYS == REFUSE_KEYS
    assert wire.EXPLORE_MESSAGE == "query.explore" and wire.EXPLORE_ARRAYS == "explore-release"
    assert wire.EXPLORE_METRICS == ("epsilon", "delta", "noise-multiplier", "epsilon-budget")
    assert wire.EXPLORE_CONFIG == ("store-id",)


@pytest.mark.parametrize("simulated", [True, False])
def test_train_reply_holds_only_designed_values(small_chain_dir, simulated, tmp_path):
    node_config = {"partition-id": 0, "num-partitions": 3} if simulated else {
        "store-dir": str(small_chain_dir / "stores" / "S001"), "catalog": str(small_chain_dir)}
    node_config["state-dir"] = str(tmp_path)
    context = _context(small_chain_dir, node_config)
    cfg = RunConfig.from_mapping(context.run_config)
    reply = handle_train(_message(small_chain_dir, MessageType.TRAIN), context, cfg)
    assert _records(reply) == {"arrays": "arrays", "metrics": "metrics", "store": "config"}
    arrays, metrics, configs = _keys(reply)
    assert arrays == {"arrays"}
    # Every listed value, and no other; the non-DP loss leaves only where the node allows
    # it: by default only in simulation.
    assert metrics == set(TRAIN_METRICS) - (set() if simulated else {"train-loss"})
    assert configs == set(TRAIN_CONFIG)
    # The arrays are the model's parameters: no member-level table of any kind.
    sent = reply.content[wire.TRAIN_ARRAYS].to_torch_state_dict()
    assert set(sent) == set(Recommender(ItemIndex.from_catalog(read_catalog(small_chain_dir))).state_dict())


def test_evaluate_reply_holds_only_designed_values(small_chain_dir):
    context = _context(small_chain_dir, {"partition-id": 1, "num-partitions": 3})
    cfg = RunConfig.from_mapping(context.run_config)
    reply = handle_evaluate(_message(small_chain_dir, MessageType.EVALUATE), context, cfg)
    assert _records(reply) == {"metrics": "metrics", "store": "config"}
    arrays, metrics, configs = _keys(reply)
    assert arrays == set()
    assert metrics == set(EVAL_METRICS)
    assert configs == set(EVAL_CONFIG)


def test_a_deployed_store_sends_no_metrics_unless_it_allows_them(small_chain_dir):
    context = _context(small_chain_dir, {"store-dir": str(small_chain_dir / "stores" / "S001"),
                                         "catalog": str(small_chain_dir)})
    with pytest.raises(PermissionError, match="allow-local-metrics"):
        handle_evaluate(_message(small_chain_dir, MessageType.EVALUATE), context,
                        RunConfig.from_mapping(context.run_config))


def _deployed(chain_dir, state_dir, **extra):
    return _context(chain_dir, {"store-dir": str(chain_dir / "stores" / "S003"), "catalog": str(chain_dir),
                                "state-dir": str(state_dir), **extra})


def test_the_event_is_in_the_ledger_before_the_update_leaves(small_chain_dir, tmp_path, monkeypatch):
    import client.client_app as client_app
    from client.state.ledger import read_events

    def crash(reply):
        raise SystemExit("power cut between the ledger write and the send")

    monkeypatch.setattr(client_app, "send", crash)
    context = _deployed(small_chain_dir, tmp_path)
    with pytest.raises(SystemExit):
        handle_train(_message(small_chain_dir, MessageType.TRAIN), context, RunConfig.from_mapping(context.run_config))
    events = read_events(tmp_path, "S003")
    assert len(events) == 1 and events[0].round == 1 and events[0].steps > 0


def test_a_corrupted_ledger_stops_training(small_chain_dir, tmp_path):
    from client.state.ledger import ledger_path
    from common.privacy.ledger import LedgerError

    ledger_path(tmp_path).write_text('{"format": "storefed-privacy-ledger", "version": 1, "store_id": "S003"}\n{"seq"')
    context = _deployed(small_chain_dir, tmp_path)
    with pytest.raises(LedgerError, match="privacy-ledger.jsonl"):
        handle_train(_message(small_chain_dir, MessageType.TRAIN), context, RunConfig.from_mapping(context.run_config))


def test_over_budget_the_store_declines_and_sends_no_weights(small_chain_dir, tmp_path):
    from client.state.ledger import read_events

    context = _deployed(small_chain_dir, tmp_path, **{"epsilon-budget": 0.05})
    reply = handle_train(_message(small_chain_dir, MessageType.TRAIN), context, RunConfig.from_mapping(context.run_config))
    assert reply.has_error() and reply.error.code == wire.DECLINE_CODE
    info = wire.parse_decline(reply.error.reason)
    assert set(info) == set(DECLINE_KEYS)
    assert info["store-id"] == "S003" and info["epsilon"] == 0.0 and info["epsilon-after"] > 0.05
    assert read_events(tmp_path, "S003") == []  # nothing trained, nothing spent


def _trained_weights(chain_dir, node_config):
    context = _context(chain_dir, node_config)
    reply = handle_train(_message(chain_dir, MessageType.TRAIN), context, RunConfig.from_mapping(context.run_config))
    return torch.cat([v.reshape(-1) for v in reply.content[wire.TRAIN_ARRAYS].to_torch_state_dict().values()])


def test_a_deployed_store_never_repeats_its_noise_but_a_simulation_reproduces(small_chain_dir, tmp_path):
    store = {"store-dir": str(small_chain_dir / "stores" / "S002"), "catalog": str(small_chain_dir)}
    # Deployed: same message, same settings, the noise and batches must still differ.
    a = _trained_weights(small_chain_dir, {**store, "state-dir": str(tmp_path / "a")})
    b = _trained_weights(small_chain_dir, {**store, "state-dir": str(tmp_path / "b")})
    assert (a - b).abs().max() > 1e-4
    # Simulated: derived from the run seed, so a rerun reproduces.
    sim = {"partition-id": 1, "num-partitions": 3}
    c = _trained_weights(small_chain_dir, {**sim, "state-dir": str(tmp_path / "c")})
    d = _trained_weights(small_chain_dir, {**sim, "state-dir": str(tmp_path / "d")})
    assert torch.allclose(c, d, rtol=0, atol=1e-6)


def test_model_delivery_reply_and_what_the_store_keeps(small_chain_dir, tmp_path, monkeypatch):
    """query.model: the store keeps checked weights and answers only its id and the hash."""
    from client.client_app import handle_model, keep_model_if_none
    from client.state.model_store import read_info
    from client.store import load_store
    from common.learning.weights import weights_digest

    node_config = {"store-dir": str(small_chain_dir / "stores" / "S001"), "catalog": str(small_chain_dir),
                   "state-dir": str(tmp_path)}
    context = _context(small_chain_dir, node_config)
    cfg = RunConfig.from_mapping(context.run_config)
    msg = _message(small_chain_dir, wire.MODEL_MESSAGE)
    digest = weights_digest(msg.content[wire.TRAIN_ARRAYS].to_torch_state_dict())
    # The store-local layer is fitted at delivery on the delivered model (the fit itself is
    # tested in test_local_layer; here the layer-free prior stands in for it, to keep this fast).
    import numpy as np

    from client.serving import layers as local_layer
    from common.learning import local_layer as ll

    fitted_on = []

    def fit(store_key, model, data):
        fitted_on.append(weights_digest(model.state_dict()))
        n = data.items.n_items
        return ll.fit(np.zeros((1, n)), ll.Histories([np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)], 0.0),
                      [np.zeros(0, np.int64)], data.store_counts, data.assortment, None)

    monkeypatch.setattr(local_layer, "layer_for", fit)
    msg.content["config"] = ConfigRecord({"run-id": "run-9", "server-round": 4, "hash": digest})
    reply = handle_model(msg, context, cfg)
    assert _records(reply) == {"store": "config"}
    arrays, metrics, configs = _keys(reply)
    assert arrays == set() and metrics == set() and configs == set(MODEL_ACK_CONFIG)
    assert reply.content["store"]["model-hash"] == digest
    info = read_info(tmp_path)
    assert (info["run_id"], info["round"], info["hash"], info["epsilon"], info["final"]) == ("run-9", 4, digest, 0.0, True)
    # The store-local layer of this model is kept next to it, tied to its hash; nothing of it is in the reply.
    from client.serving import layers as layer_store

    assert layer_store.read_layer(tmp_path, digest)[1]["fitted_by"] == "delivery" and fitted_on == [digest]
    # A wrong announced hash, or weights of another shape, are refused and nothing changes.
    msg.content["config"] = ConfigRecord({"run-id": "run-10", "server-round": 5, "hash": "0" * 64})
    with pytest.raises(ValueError, match="hash differs"):
        handle_model(msg, context, cfg)
    bad = _message(small_chain_dir, wire.MODEL_MESSAGE)
    state = bad.content[wire.TRAIN_ARRAYS].to_torch_state_dict()
    state["item_out.bias"] = state["item_out.bias"][:-1]
    bad.content[wire.TRAIN_ARRAYS] = ArrayRecord(state)
    bad.content["config"] = ConfigRecord({"run-id": "run-11", "server-round": 5, "hash": weights_digest(state)})
    with pytest.raises(ValueError, match="shape"):
        handle_model(bad, context, cfg)
    assert read_info(tmp_path)["run_id"] == "run-9"
    # A store with a model keeps it when a later run's messages arrive; one without takes
    # the first trained global model (round ≥ 2), not a run's untrained initial model.
    other = tmp_path / "other"
    context2 = _context(small_chain_dir, {**node_config, "state-dir": str(other)})
    node = load_store(context2.node_config, cfg)  # the store's paths come from its node config
    first = _message(small_chain_dir, MessageType.TRAIN)
    keep_model_if_none(first, context2, cfg, node, final=False)
    assert read_info(other) is None
    second = _message(small_chain_dir, MessageType.TRAIN)
    second.content["config"] = ConfigRecord({"server-round": 2})
    keep_model_if_none(second, context2, cfg, node, final=False)
    assert read_info(other)["final"] is False and read_info(other)["round"] == 2
