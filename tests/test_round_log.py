"""The server's round log names every store by what it did, including stores that vanished."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict

from common.exchange import wire
from common.data.dataset import ItemIndex
from common.learning.model import Recommender
from common.data.storefiles import read_catalog
from server.strategy import make_strategy


def _train_message(chain_dir, node_id: int) -> Message:
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def test_the_server_names_each_store_by_what_it_did(small_chain_dir, task_identity):
    lines: list[str] = []
    strategy = make_strategy("fedavg", num_rounds=1, printer=lines.append)
    strategy.stores_by_node[9] = "S003"  # S003 replied in an earlier round
    asked = [_train_message(small_chain_dir, node) for node in (8, 9, 10)]
    for i, msg in enumerate(asked):
        msg.metadata.__dict__["_message_id"] = f"m{i}"  # what the Grid sets when it sends
    strategy._asked = asked
    refused = Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason("S004", "x.csv: column 'q' missing")),
                      reply_to=asked[0])
    vanished = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=asked[1])
    strategy.aggregate_train(1, [refused, vanished])  # node 10 never answered
    assert "  store S004 refused round 1 (it cannot train): x.csv: column 'q' missing" in lines
    assert "  store S003 failed in round 1: Error: Node Unavailable" in lines
    assert "  round 1: refused S004 · failed S003, node-10" in lines
    assert [(f["store"], f["reason"]) for f in strategy.failures] == [
        ("S004", "refused: x.csv: column 'q' missing"), ("S003", "Error: Node Unavailable"),
        ("node-10", "no reply within the round timeout (round-timeout-s)")]
    assert strategy.rounds[-1]["failed"] == 3
