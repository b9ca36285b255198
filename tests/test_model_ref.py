"""The simulation's model reference: the round's global model crosses to the workers once,
checked by hash; a deployed store refuses a message that names a model instead of carrying it;
the ClientApp's reused model object gives bit-identical training and scores."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import client_app
from common.config import RunConfig
from common.evaluation.evaluation import model_scores
from common.exchange import wire
from common.learning.model import ModelConfig, Recommender
from common.learning.training import DPConfig, TrainConfig, train_local
from simulations.engine.model_ref import Inbox, ModelRefError, Outbox, arrays_digest


def _arrays(seed: int) -> ArrayRecord:
    g = np.random.default_rng(seed)
    return ArrayRecord({"a.weight": Array(g.normal(size=(3, 4)).astype(np.float32)),
                        "a.bias": Array(g.normal(size=(3,)).astype(np.float32))})


def _message(arrays: ArrayRecord, node_id: int, server_round: int = 2) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


class _Store:
    """Ray's object store, as a dict that counts puts and gets."""

    def __init__(self) -> None:
        self.objects: dict[int, ArrayRecord] = {}
        self.gets = 0

    def put(self, record: ArrayRecord) -> int:
        self.objects[len(self.objects)] = record
        return len(self.objects) - 1

    def get(self, ref: int) -> ArrayRecord:
        self.gets += 1
        return self.objects[ref]


def test_a_rounds_model_is_put_once_fetched_once_per_worker_and_given_back_exactly(task_identity):
    store, arrays = _Store(), _arrays(0)
    outbox, inbox = Outbox(put=store.put), Inbox(get=store.get)
    sent = [outbox.light(_message(arrays, node_id=n)) for n in range(5)]
    assert outbox.puts == 1 and len(store.objects) == 1  # five stores, one copy
    for light, refs in sent:
        assert wire.TRAIN_ARRAYS not in light.content and refs == [0]
        expected = hashlib.sha256()  # the digest, written out: name, dtype, shape, stype, length, bytes
        for name, array in arrays.items():
            expected.update(f"{name}\0{array.dtype}\0{tuple(array.shape)}\0{array.stype}\0{len(array.data)}\0".encode())
            expected.update(array.data)
        assert light.content[wire.MODEL_REF]["sha256"] == expected.hexdigest()
    restored = [inbox.resolve(light, refs) for light, refs in sent]
    assert store.gets == 1  # one fetch for the worker's five tasks
    for message, (light, _) in zip(restored, sent):
        assert list(message.content.keys()) == ["arrays", "config"]  # as the strategy built it
        assert wire.MODEL_REF not in message.content
        assert message.metadata.dst_node_id == light.metadata.dst_node_id
        got = message.content["arrays"].to_numpy_ndarrays()
        for a, b in zip(got, arrays.to_numpy_ndarrays()):
            np.testing.assert_array_equal(a, b)
    # A copy of the same arrays (as the final delivery makes per store) goes by the same reference.
    again, refs = outbox.light(_message(_arrays(0), node_id=9))
    assert outbox.puts == 1 and refs == [0] and again.content[wire.MODEL_REF]["sha256"] == light.content[wire.MODEL_REF]["sha256"]
    # The next round's model: put once more.
    outbox.light(_message(_arrays(1), node_id=0, server_round=3))
    assert outbox.puts == 2


def test_messages_without_a_model_go_as_they_are(task_identity):
    outbox = Outbox(put=lambda _: pytest.fail("nothing to put"))
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type=MessageType.EVALUATE)
    assert outbox.light(msg) == (msg, [])
    assert Inbox(get=lambda _: pytest.fail("nothing to get")).resolve(msg, []) is msg


def test_a_fetched_model_whose_hash_differs_is_an_error_and_is_not_kept(task_identity):
    store = _Store()
    light, refs = Outbox(put=store.put).light(_message(_arrays(0), node_id=1))
    tampered = _arrays(0)
    store.objects[refs[0]] = ArrayRecord({"a.weight": Array(tampered["a.weight"].numpy() + 1e-3),
                                          "a.bias": tampered["a.bias"]})
    inbox = Inbox(get=store.get)
    with pytest.raises(ModelRefError, match="not the .* its message names"):
        inbox.resolve(light, refs)
    with pytest.raises(ModelRefError, match="brings no reference"):
        inbox.resolve(light, [])
    store.objects[refs[0]] = _arrays(0)  # the right arrays: now accepted (nothing bad was cached)
    assert arrays_digest(inbox.resolve(light, refs).content["arrays"]) == light.content[wire.MODEL_REF]["sha256"]


def test_a_deployed_store_refuses_a_message_that_names_a_model_and_reads_nothing(small_chain_dir, tmp_path,
                                                                                 task_identity, monkeypatch, capsys):
    light, _ = Outbox(put=lambda _: "elsewhere").light(_message(_arrays(0), node_id=7))
    light.metadata.__dict__["_message_id"] = "m1"

    def no_read(*_a, **_k):
        raise AssertionError("the store read something")

    for name in ("load_store", "authorize", "store_policy_for"):
        monkeypatch.setattr(client_app, name, no_read)
    store_dir = small_chain_dir / "stores" / "S001"
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={"data-dir": str(small_chain_dir)},
                      node_config={"store-dir": str(store_dir), "catalog": str(small_chain_dir),
                                   "state-dir": str(tmp_path / "state")})
    reply = client_app.create_app()(message=light, context=context)  # the app `storefed store-exec` runs
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    info = wire.parse_refusal(reply.error.reason)
    assert info["store-id"] == "S001" and wire.MODEL_REF in info["reason"] and "nothing was read" in info["reason"]
    assert not (tmp_path / "state").exists()
    assert "store S001 refuses train" in capsys.readouterr().err


def test_the_reused_model_object_trains_and_scores_bit_identically_to_a_fresh_one(small_store, task_identity):
    cfg = RunConfig.from_mapping({})
    mcfg = ModelConfig(dim=int(cfg["dim"]), hidden=int(cfg["hidden"]))
    torch.manual_seed(5)
    weights = Recommender(small_store.items, mcfg).state_dict()
    torch.manual_seed(6)
    other = Recommender(small_store.items, mcfg).state_dict()
    train_cfg = TrainConfig(local_epochs=1, batch_size=64, lr=0.05, seed=11)
    dp = DPConfig(1.0, 1.0, small_store.n_train_members)

    def message(state: dict) -> Message:
        return Message(content=RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in state.items()})}),
                       dst_node_id=1, message_type=MessageType.TRAIN)

    def run(model: Recommender) -> tuple[dict, np.ndarray]:
        train_local(model, small_store, train_cfg, dp)
        return {k: v.clone() for k, v in model.state_dict().items()}, model_scores(model, small_store)

    fresh = Recommender(small_store.items, mcfg)
    fresh.load_state_dict(weights)
    want_state, want_scores = run(fresh)
    node = SimpleNamespace(data=small_store)
    client_app._MODEL.clear()
    first = client_app._model(node, cfg, client_app.checked_global(message(other), node, cfg))
    run(first)  # the object now holds another task's trained weights, snapshot and gradients
    again = client_app._model(node, cfg, client_app.checked_global(message(weights), node, cfg))
    assert again is first  # one object, weights loaded in place
    got_state, got_scores = run(again)
    assert all(torch.equal(want_state[k], got_state[k]) for k in want_state)
    np.testing.assert_array_equal(want_scores, got_scores)
