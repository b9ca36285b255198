"""Compressed updates (update-encoding): exact decoding bounds, unbiased rounding, refusals,
and the store's real reply under int8 decoding to its float32 reply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from common.exchange import update_codec
from common.exchange import wire
from common.config import RunConfig


def _model_like(rng):
    ref = {"w": rng.normal(0, 0.1, (50, 8)).astype(np.float32), "b": rng.normal(0, 0.1, 50).astype(np.float32)}
    new = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in ref.items()}
    return ref, new


def test_float32_sends_the_weights_and_float16_the_update_to_half_precision(rng):
    ref, new = _model_like(rng)
    assert all(np.array_equal(a, new[k]) for k, a in update_codec.encode(new, ref, "float32", rng).items())
    sent = update_codec.encode(new, ref, "float16", rng)
    assert all(a.dtype == np.float16 for a in sent.values())
    back = update_codec.decode(sent, ref, "float16")
    for k in ref:
        # float16 keeps 11 significant bits of the update (not of the weight).
        assert np.allclose(back[k], new[k], rtol=0, atol=np.abs(new[k] - ref[k]).max() * 2**-10)


def test_int8_error_is_within_one_step_per_row_and_unbiased(rng):
    ref, new = _model_like(rng)
    sent = update_codec.encode(new, ref, "int8", rng)
    assert sent["w"].dtype == np.int8 and sent["w.scale"].shape == (50,) and sent["b.scale"].shape == (1,)
    back = update_codec.decode(sent, ref, "int8")
    step = np.abs(new["w"] - ref["w"]).max(axis=1, keepdims=True) / 127
    assert (np.abs(back["w"] - new["w"]) <= step * (1 + 1e-5)).all()
    # Averaging many stores' roundings recovers the update (stochastic rounding is unbiased).
    mean = np.mean([update_codec.decode(update_codec.encode(new, ref, "int8", rng), ref, "int8")["w"]
                    for _ in range(400)], axis=0)
    assert np.abs(mean - new["w"]).max() < step.max() * 0.2


@pytest.mark.parametrize("mangle", ["drop-scale", "shape", "dtype"])
def test_a_malformed_update_is_refused(rng, mangle):
    ref, new = _model_like(rng)
    sent = update_codec.encode(new, ref, "int8", rng)
    if mangle == "drop-scale":
        del sent["w.scale"]
    elif mangle == "shape":
        sent["w"] = sent["w"][:, :-1]
    else:
        sent["w"] = sent["w"].astype(np.float32)
    with pytest.raises(ValueError):
        update_codec.decode(sent, ref, "int8")


def test_a_store_int8_reply_decodes_to_its_float32_reply(small_chain_dir, tmp_path, task_identity):
    from client.client_app import handle_train

    def reply(encoding, state):
        context = _context(small_chain_dir, {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / state)})
        # A fixed σ skips the noise calibration (seconds of PRV bisection), irrelevant here.
        cfg = RunConfig.from_mapping({**context.run_config, "update-encoding": encoding, "noise-multiplier": 1.0})
        msg = _message(small_chain_dir, MessageType.TRAIN)
        sent = {k: v.numpy() for k, v in msg.content[wire.TRAIN_ARRAYS].items()}
        out = handle_train(msg, context, cfg)
        return sent, {k: v.numpy() for k, v in out.content[wire.TRAIN_ARRAYS].items()}

    sent, full = reply("float32", "a")
    _, packed = reply("int8", "b")  # same simulated seed: the same training, only encoded
    assert set(packed) == set(full) | {k + update_codec.SCALE_SUFFIX for k in full}
    size = lambda arrays: sum(a.nbytes for a in arrays.values())  # noqa: E731
    assert size(packed) < 0.3 * size(full)
    back = update_codec.decode(packed, sent, "int8")
    for k in full:
        step = np.abs(_rows(full[k] - sent[k])).max(axis=1) / 127
        assert (np.abs(_rows(back[k] - full[k])) <= step[:, None] * (1 + 1e-4) + 1e-7).all(), k
    assert max(np.abs(full[k] - sent[k]).max() for k in full) > 1e-3, "training moved the model"


def _context(chain_dir, node_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={"data-dir": str(chain_dir), "rounds": 2, "stores": 3})


def _message(chain_dir, kind):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from common.data.dataset import ItemIndex
    from common.learning.model import Recommender
    from common.data.storefiles import read_catalog

    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _rows(a):
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
