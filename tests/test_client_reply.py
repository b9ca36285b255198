"""What a store's replies actually contain: only the values DESIGN §4.3 lists (common.wire)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import handle_evaluate, handle_train
from common import wire
from common.config import RunConfig
from common.dataset import ItemIndex
from common.model import Recommender
from common.storefiles import read_catalog


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need the task identity a SuperNode's runtime sets in its process."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


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


@pytest.mark.parametrize("simulated", [True, False])
def test_train_reply_holds_only_designed_values(small_chain_dir, simulated):
    node_config = {"partition-id": 0, "num-partitions": 3} if simulated else {
        "store-dir": str(small_chain_dir / "stores" / "S001"), "catalog": str(small_chain_dir)}
    context = _context(small_chain_dir, node_config)
    cfg = RunConfig.from_mapping(context.run_config)
    reply = handle_train(_message(small_chain_dir, MessageType.TRAIN), context, cfg)
    arrays, metrics, configs = _keys(reply)
    assert arrays == {wire.TRAIN_ARRAYS}
    assert metrics <= set(wire.TRAIN_METRICS)
    assert configs <= set(wire.TRAIN_CONFIG)
    # The non-DP loss leaves only where the node allows it: by default only in simulation.
    assert ("train-loss" in metrics) == simulated
    # The arrays are the model's parameters: no member-level table of any kind.
    sent = reply.content[wire.TRAIN_ARRAYS].to_torch_state_dict()
    assert set(sent) == set(Recommender(ItemIndex.from_catalog(read_catalog(small_chain_dir))).state_dict())


def test_evaluate_reply_holds_only_designed_values(small_chain_dir):
    context = _context(small_chain_dir, {"partition-id": 1, "num-partitions": 3})
    cfg = RunConfig.from_mapping(context.run_config)
    reply = handle_evaluate(_message(small_chain_dir, MessageType.EVALUATE), context, cfg)
    arrays, metrics, configs = _keys(reply)
    assert arrays == set()
    assert metrics == set(wire.EVAL_METRICS)
    assert configs <= set(wire.EVAL_CONFIG)


def test_a_deployed_store_sends_no_metrics_unless_it_allows_them(small_chain_dir):
    context = _context(small_chain_dir, {"store-dir": str(small_chain_dir / "stores" / "S001"),
                                         "catalog": str(small_chain_dir)})
    with pytest.raises(PermissionError, match="allow-local-metrics"):
        handle_evaluate(_message(small_chain_dir, MessageType.EVALUATE), context,
                        RunConfig.from_mapping(context.run_config))
