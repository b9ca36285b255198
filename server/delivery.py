"""The end of a run: the final global model to every connected store (DESIGN §5.2).

One Flower message of type ``query.model`` per connected node, carrying the weights and
their content hash; each store checks the weights against its catalog and the hash, keeps
them under its state directory and answers with its store id and the hash it kept
(:data:`common.exchange.wire.MODEL_ACK_CONFIG`). A store that is offline now receives a model
with the messages of its next run (see ``client.client_app.keep_model_if_none``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.exchange import packing, wire


def deliver_model(grid: Grid, state: Mapping[str, object], *, run_id: str, server_round: int, digest: str,
                  timeout: float) -> dict:
    """Send the final model to every node now connected; returns what the stores answered:
    ``{"hash", "round", "delivered": [store ids], "failed": [{"node", "reason"}]}``."""
    def content() -> RecordDict:
        return RecordDict({
            # Packed (common.exchange.packing): a handful of Fleet objects per store, not one per tensor.
            wire.TRAIN_ARRAYS: ArrayRecord({k: Array(v) for k, v in
                                            packing.pack({k: np.asarray(v) for k, v in state.items()}).items()}),
            "config": ConfigRecord({"run-id": str(run_id), "server-round": int(server_round), "hash": digest}),
        })

    nodes = list(grid.get_node_ids())
    messages = [Message(content=content(), message_type=wire.MODEL_MESSAGE, dst_node_id=node) for node in nodes]
    out: dict = {"hash": digest, "round": int(server_round), "delivered": [], "failed": []}
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            refusal = wire.parse_refusal(reply.error.reason) if reply.error.code == wire.REFUSE_CODE else None
            failed = {"node": node, "reason": str(reply.error.reason)[:300]}
            if refusal is not None:  # the store said who it is and why it would not keep the model
                failed.update(store=str(refusal.get("store-id", "")), reason=str(refusal.get("reason", ""))[:300])
            out["failed"].append(failed)
            continue
        store = reply.content["store"]
        if str(store.get("model-hash", "")) != digest:
            out["failed"].append({"node": node, "reason": f"store {store.get('store-id')} kept another hash"})
        else:
            out["delivered"].append(str(store.get("store-id", f"node-{node}")))
    for node in nodes:
        if node not in answered:
            out["failed"].append({"node": node, "reason": "no answer before the timeout"})
    out["delivered"].sort()
    return out
