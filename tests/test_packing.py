"""The packed wire format (common.exchange.packing): lossless, checked exactly by the
receiver from its own layout, and a handful of Fleet objects per message instead of one
per tensor (what limits how many stores one SuperLink serves)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

import client.client_app as client_app
from client.state.ledger import ledger_path
from common.data.dataset import ItemIndex
from common.data.storefiles import read_catalog
from common.exchange import packing, update_codec, wire
from common.learning.model import Recommender
from server.strategy import ObserverMixin, STRATEGIES, packed_arrays, packed_messages

pytestmark = pytest.mark.usefixtures("task_identity")


def test_pack_concatenates_each_dtype_in_sorted_name_order_and_unpack_inverts_it():
    b = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = np.array([-1.5], dtype=np.float32)
    q = np.array([[1, -2], [3, 4]], dtype=np.int8)
    packed = packing.pack({"b": b, "q": q, "a": a})
    assert sorted(packed) == ["packed:float32", "packed:int8"]
    # By hand: "a" sorts before "b", so the float32 part is a's value and then b row by row.
    assert packed["packed:float32"].tolist() == [-1.5, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert packed["packed:int8"].tolist() == [1, -2, 3, 4]
    layout = packing.layout_of({"a": (1,), "b": (2, 3), "q": (2, 2)}, {"a": "float32", "b": "float32", "q": "int8"})
    out = packing.unpack(packed, layout)
    assert set(out) == {"a", "b", "q"}
    for name, want in (("a", a), ("b", b), ("q", q)):
        assert out[name].dtype == want.dtype and np.array_equal(out[name], want)
    assert packing.is_packed(packed) and not packing.is_packed({"a": a}) and not packing.is_packed({})


@pytest.mark.parametrize("bad, message", [
    ({"packed:float32": np.zeros(7, np.float32)}, r"do not match the model's \['packed:float32', 'packed:int8'\]"),
    ({"packed:float32": np.zeros(6, np.float32), "packed:int8": np.zeros(4, np.int8)}, r"float32\[6\]; the model needs float32\[7\]"),
    ({"packed:float32": np.zeros(7, np.float64), "packed:int8": np.zeros(4, np.int8)}, r"is float64\[7\]"),
    ({"packed:float32": np.zeros((7, 1), np.float32), "packed:int8": np.zeros(4, np.int8)}, r"float32\[7, 1\]"),
])
def test_unpack_refuses_anything_but_the_exact_layout(bad, message):
    layout = packing.layout_of({"a": (1,), "b": (2, 3), "q": (2, 2)}, {"a": "float32", "b": "float32", "q": "int8"})
    with pytest.raises(packing.PackingError, match=message):
        packing.unpack(bad, layout)


@pytest.mark.parametrize("encoding", update_codec.ENCODINGS)
def test_the_encoded_layout_is_the_layout_of_what_encode_returns(encoding):
    rng = np.random.default_rng(3)
    ref = {"w": rng.standard_normal((5, 4)).astype(np.float32), "v": rng.standard_normal(3).astype(np.float32)}
    weights = {k: v + 0.1 for k, v in ref.items()}
    encoded = update_codec.encode(weights, ref, encoding, np.random.default_rng(0))
    assert update_codec.encoded_layout(ref, encoding) == packing.layout_of_arrays(encoded)
    back = update_codec.decode(packing.unpack(packing.pack(encoded), update_codec.encoded_layout(ref, encoding)),
                               ref, encoding)
    want = update_codec.decode(encoded, ref, encoding)
    assert all(np.array_equal(back[k], want[k]) for k in ref)


def _state(chain_dir) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Recommender(ItemIndex.from_catalog(read_catalog(chain_dir))).state_dict()


def _message(arrays: ArrayRecord) -> Message:
    content = RecordDict({wire.TRAIN_ARRAYS: arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(chain_dir, state_dir) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(state_dir)}
    run_config = {"data-dir": str(chain_dir), "stores": 3, "rounds": 2, "noise-multiplier": 1.0, "dp": False}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_a_packed_model_trains_exactly_as_the_same_model_sent_tensor_by_tensor(small_chain_dir, tmp_path):
    state = _state(small_chain_dir)
    plain = ArrayRecord({k: v.clone() for k, v in state.items()})
    app = client_app.create_app()
    by_tensor = app(_message(plain), _context(small_chain_dir, tmp_path / "a"))
    packed = app(_message(packed_arrays(plain)), _context(small_chain_dir, tmp_path / "b"))
    assert not by_tensor.has_error() and not packed.has_error()
    got = {k: v.numpy() for k, v in packed.content[wire.TRAIN_ARRAYS].items()}
    assert list(got) == ["packed:float32"]  # the reply comes packed, as the model did
    want = {k: v.numpy() for k, v in by_tensor.content[wire.TRAIN_ARRAYS].items()}
    unpacked = packing.unpack(got, packing.layout_of_arrays(want))
    assert all(np.array_equal(unpacked[k], want[k]) for k in want)


def test_a_packed_model_of_the_wrong_length_or_dtype_is_refused_and_spends_nothing(small_chain_dir, tmp_path):
    state = _state(small_chain_dir)
    flat = packing.pack({k: v.numpy() for k, v in state.items()})["packed:float32"]
    app = client_app.create_app()
    short = ArrayRecord({"packed:float32": Array(flat[:-1])})
    reply = app(_message(short), _context(small_chain_dir, tmp_path))
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    assert wire.parse_refusal(reply.error.reason)["reason"].startswith(
        f"'packed:float32' holds {flat.size - 1:,} values in ")
    assert f"the store's catalog needs {flat.size:,} float32 values" in reply.error.reason
    wide = ArrayRecord({"packed:float64": Array(flat.astype(np.float64))})
    reply = app(_message(wide), _context(small_chain_dir, tmp_path))
    assert "a packed model is one array 'packed:float32'" in reply.error.reason
    as_int = ArrayRecord({"packed:float32": Array(flat.view(np.int32))})
    reply = app(_message(as_int), _context(small_chain_dir, tmp_path))
    assert "'packed:float32' is 'int32'" in reply.error.reason
    bad = flat.copy()
    bad[5] = np.nan
    reply = app(_message(ArrayRecord({"packed:float32": Array(bad)})), _context(small_chain_dir, tmp_path))
    assert wire.parse_refusal(reply.error.reason)["reason"].endswith("holds NaN or infinite values")
    assert not ledger_path(tmp_path).exists()


def test_a_packed_train_message_is_a_handful_of_fleet_objects(small_chain_dir):
    state = _state(small_chain_dir)
    plain = ArrayRecord({k: v.clone() for k, v in state.items()})
    strategy = type("Observed", (ObserverMixin, STRATEGIES["fedavg"]), {})(num_rounds=1, printer=lambda _: None)
    messages = [Message(content=RecordDict({wire.TRAIN_ARRAYS: plain, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]
    before = len(get_all_nested_objects(messages[0]))
    packed = packed_messages(messages)
    after = len(get_all_nested_objects(packed[0]))
    # One object per tensor and per chunk before (17 tensors); one array and one chunk after.
    assert before >= 2 * len(state) and after <= 8, (before, after)
    assert packed[0].content[wire.TRAIN_ARRAYS] is packed[1].content[wire.TRAIN_ARRAYS]  # packed once
    # The server reads a packed int8 reply exactly as the same reply sent tensor by tensor.
    strategy.update_encoding = "int8"
    strategy._sent = {k: v.numpy() for k, v in state.items()}
    weights = {k: v.numpy() + 0.01 for k, v in state.items()}
    encoded = update_codec.encode(weights, strategy._sent, "int8", np.random.default_rng(1))
    got = strategy._decoded(ArrayRecord({k: Array(v) for k, v in packing.pack(encoded).items()}))
    want = update_codec.decode(encoded, strategy._sent, "int8")
    assert set(got) == set(want) and all(np.array_equal(got[k].numpy(), want[k]) for k in want)
    # A packed reply that does not fit is passed on as it came: the update checks reject it.
    short = ArrayRecord({"packed:float32": Array(np.zeros(3, np.float32))})
    assert list(strategy._decoded(short)) == ["packed:float32"]
