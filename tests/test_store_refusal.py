"""A store that cannot train (missing or invalid files) refuses with its reason; it does not crash."""

from __future__ import annotations

import json
import shutil

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import handle_train, refuse_when_unusable
from common.exchange import wire
from common.config import RunConfig
from common.data.dataset import ItemIndex
from common.learning.model import Recommender
from common.data.storefiles import read_catalog


def _train_message(chain_dir, node_id: int = 7) -> Message:
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def _refusal(chain_dir, store_dir, tmp_path) -> Message:
    node_config = {"store-dir": str(store_dir), "catalog": str(chain_dir), "state-dir": str(tmp_path / "state")}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={"data-dir": str(chain_dir), "rounds": 2, "stores": 3})
    msg = _train_message(chain_dir)
    cfg = RunConfig.from_mapping(context.run_config)
    return refuse_when_unusable(msg, context, lambda: handle_train(msg, context, cfg))


def test_a_store_with_a_missing_column_refuses_and_names_itself_and_the_file(small_chain_dir, tmp_path,
                                                                            task_identity, capsys):
    store = tmp_path / "S002"
    shutil.copytree(small_chain_dir / "stores" / "S002", store)
    members = store / "members.csv"
    lines = members.read_text().splitlines()
    col = lines[0].split(",").index("consent_training")
    members.write_text("\n".join(",".join(c for i, c in enumerate(l.split(",")) if i != col) for l in lines) + "\n")
    reply = _refusal(small_chain_dir, store, tmp_path)
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    info = wire.parse_refusal(reply.error.reason)
    assert set(info) == set(wire.REFUSE_KEYS) and info["store-id"] == "S002"
    assert "members.csv" in info["reason"] and "consent_training" in info["reason"]
    assert not (tmp_path / "state" / "privacy-ledger.jsonl").exists()  # nothing trained, nothing spent
    assert "store S002 refuses train" in capsys.readouterr().err  # the store's own log says it too


def test_a_missing_store_directory_refuses_too(small_chain_dir, tmp_path, task_identity):
    reply = _refusal(small_chain_dir, tmp_path / "S404", tmp_path)
    info = wire.parse_refusal(reply.error.reason)
    assert info["store-id"] == "S404"
    assert info["reason"].startswith(f"{tmp_path / 'S404'}: store directory not found; check the node config")


def test_other_errors_stay_errors(small_chain_dir, tmp_path, task_identity):
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def broken() -> Message:
        raise ZeroDivisionError("a bug, not the store's data")

    with pytest.raises(ZeroDivisionError):
        refuse_when_unusable(_train_message(small_chain_dir), context, broken)


def test_refusal_reasons_are_capped():
    reason = wire.refuse_reason("S001", "x" * 5000)
    assert len(json.loads(reason[len(wire.REFUSE_PREFIX):])["reason"]) == wire.REFUSE_REASON_MAX
