"""Lightweight store clients for ``storefed bench deploy``: the real Fleet API, no store behind it.

Each client is one registered SuperNode identity (its own EC P-384 key, signed requests over
TLS, exactly as ``flower-supernode`` sends them, through Flower's own FleetHttpClient and
NodeAuthHttpInterceptor). It activates, sends heartbeats at the SuperNode's pace from a
thread of its own, polls for messages every 3 s like the SuperNode's idle loop, pulls every
object of a message, confirms it, and pushes a reply of the same shape and size as a real
store's, object by object.

What it skips (the store's side of a round, which is not server cost): the SuperNode's
local state and ClientApp process, the run-signature and pinned-code checks, the ledger and
DP-SGD. Its train reply is the received model plus small noise (so its objects are new, as a
trained model's are, and the SuperLink stores and serves every byte), with DP metrics
that are placeholders; its explore reply a random vector of the release's length; it
acknowledges the final model with the announced hash; it refuses evaluation (the bench runs
with fraction-evaluate=0).

A straggler (``"late": {"2": 25}`` in its entry of the spec) answers that round's train
message that many seconds late, for the round-timeout fault.

Run as ``python -m simulations.bench.fleet_clients SPEC.json STATS.json``: one process holds
many clients (two threads each: polls, heartbeats) and rewrites STATS.json every second until SIGTERM.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

POLL_S = 3.0  # flwr/supernode/start_client_internal.py: the idle SuperNode pulls every 3 s
STATS_EVERY_S = 1.0


@dataclass
class Stats:
    """What every client of one process did: request counts and payload bytes per Fleet
    method, each handled message, errors. Guarded by ``lock`` (clients are threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    activated: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    bytes_out: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)
    handled: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, method: str, sent: int, received: int) -> None:
        with self.lock:
            self.requests[method] = self.requests.get(method, 0) + 1
            self.bytes_out[method] = self.bytes_out.get(method, 0) + sent
            self.bytes_in[method] = self.bytes_in.get(method, 0) + received

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"activated": self.activated, "requests": dict(self.requests), "bytes_out": dict(self.bytes_out),
                    "bytes_in": dict(self.bytes_in), "handled": list(self.handled), "errors": list(self.errors)}


class LightStore:
    """One store identity speaking the Fleet API (see the module docstring for what it skips)."""

    def __init__(self, store_id: str, address: str, ca_cert: Path, private_key: Path, release_length: int,
                 stats: Stats, late: dict[str, float] | None = None) -> None:
        from cryptography.hazmat.primitives import serialization
        from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        key = serialization.load_ssh_private_key(Path(private_key).read_bytes(), password=None)
        self.store_id, self.release_length, self.stats = store_id, release_length, stats
        self.late = late or {}  # server round → seconds this store takes before it answers (a straggler)
        self.public_key = key.public_key()
        self.client = FleetHttpClient.from_server_address(
            address, False, str(ca_cert),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                          NodeAuthHttpInterceptor(key, self.public_key)])
        self.node = None

    def call(self, method: str, request: Any) -> Any:
        response = getattr(self.client, method)(request)
        self.stats.count(method, request.ByteSize(), response.ByteSize())
        return response

    def activate(self, stop: threading.Event) -> bool:
        from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL
        from flwr.proto.fleet_pb2 import ActivateNodeRequest
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        while not stop.is_set():
            try:
                response = self.call("ActivateNode", ActivateNodeRequest(
                    public_key=public_key_to_bytes(self.public_key), heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
            except Exception as exc:  # the SuperLink busy or not yet up: retry as the SuperNode does
                self.error(f"activate: {type(exc).__name__}: {exc}")
                stop.wait(1.0 + random.random())
                continue
            self.node = Node(node_id=response.node_id)
            with self.stats.lock:
                self.stats.activated += 1
            return True
        return False

    def error(self, text: str) -> None:
        with self.stats.lock:
            if len(self.stats.errors) < 200:
                self.stats.errors.append(f"{self.store_id}: {text[:300]}")

    def run(self, stop: threading.Event) -> None:
        """Activate, then heartbeat (its own thread, as Flower's HeartbeatSender: a long
        pull or push must not starve it) and poll until ``stop``; deactivate."""
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest, PullMessagesRequest

        if not self.activate(stop):
            return
        beating = threading.Thread(target=self.beat, args=(stop,), daemon=True, name=f"{self.store_id}-heartbeat")
        beating.start()
        stop.wait(random.uniform(0, POLL_S))  # clients started together must not poll in step
        while not stop.is_set():
            try:
                response = self.call("PullMessages", PullMessagesRequest(node=self.node))
                if response.messages_list:
                    self.handle(response.messages_list[0], response.message_object_trees[0])
                    continue  # as the SuperNode: after a message, pull again at once
            except Exception as exc:
                # As the SuperNode: log and poll again (a restarted SuperLink with its state
                # database still knows this node; it never activates twice).
                self.error(f"{type(exc).__name__}: {exc}")
            stop.wait(POLL_S)
        beating.join(timeout=5)
        try:
            self.client.DeactivateNode(DeactivateNodeRequest(node_id=self.node.node_id))
        except Exception:  # shutting down: the SuperLink may already be gone
            pass

    def beat(self, stop: threading.Event) -> None:
        """A heartbeat every 0.8 × the interval announced (Flower's pace), ±10 %."""
        from flwr.common.constant import HEARTBEAT_BASE_MULTIPLIER, HEARTBEAT_DEFAULT_INTERVAL
        from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest

        while not stop.wait(HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_BASE_MULTIPLIER * random.uniform(0.9, 1.1)):
            try:
                self.call("SendNodeHeartbeat", SendNodeHeartbeatRequest(
                    node=self.node, heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL))
            except Exception as exc:
                self.error(f"heartbeat: {type(exc).__name__}: {exc}")

    def handle(self, proto: Any, tree: Any) -> None:
        """Pull a message's objects, confirm, answer, push the reply's objects."""
        from flwr.app.message.message import remove_content_from_message
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.fleet_pb2 import PushMessagesRequest
        from flwr.supercore.inflatable.inflatable_object import (get_all_nested_objects, get_object_tree,
                                                                 iterate_object_tree, no_object_id_recompute)
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf, make_push_object_fn_protobuf)
        from flwr.supercore.inflatable.inflatable_utils import (inflate_object_from_contents, pull_objects,
                                                                push_object_contents_from_iterable)

        received = time.time()
        msg = message_from_proto(proto)
        run_id = msg.metadata.run_id
        ids = [t.object_id for t in iterate_object_tree(tree)]
        contents = pull_objects(ids, make_pull_object_fn_protobuf(lambda r: self.call("PullObject", r),
                                                                  self.node, run_id))
        make_confirm_message_received_fn_protobuf(lambda r: self.call("ConfirmMessageReceived", r),
                                                  self.node, run_id)(msg.metadata.message_id)
        pulled = time.time()
        bytes_pulled = sum(len(c) for c in contents.values())  # before inflating, which consumes them
        full = inflate_object_from_contents(tree.object_id, contents)
        config = full.content.config_records.get("config", {})
        server_round = str(config.get("server-round", ""))  # Flower's strategies put the round there
        if msg.metadata.message_type.startswith("train") and server_round in self.late:
            time.sleep(self.late[server_round])
        reply = self.answer(msg, full.content, server_round)
        with no_object_id_recompute():
            reply.metadata.__dict__["_message_id"] = reply.object_id
        reply_tree = get_object_tree(reply)
        objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        answered = time.time()
        response = self.call("PushMessages", PushMessagesRequest(
            node=self.node, messages_list=[message_to_proto(remove_content_from_message(reply))],
            message_object_trees=[reply_tree], clientapp_runtime_list=[answered - pulled]))
        wanted = set(response.objects_to_push)
        push_object_contents_from_iterable(
            ((t.object_id, objects[t.object_id]) for t in iterate_object_tree(reply_tree) if t.object_id in wanted),
            make_push_object_fn_protobuf(lambda r: self.call("PushObject", r), self.node, run_id, response.session_id))
        with self.stats.lock:
            self.stats.handled.append({
                "store": self.store_id, "type": msg.metadata.message_type, "round": server_round,
                "received": received, "pulled": pulled, "answered": answered, "sent": time.time(),
                "objects_pulled": len(ids), "objects_pushed": len(wanted),
                "bytes_pulled": bytes_pulled,
                "bytes_pushed": sum(len(objects[o]) for o in wanted)})

    def answer(self, msg: Any, content: Any, server_round: str = "") -> Any:
        """A reply shaped as a real store's (common/exchange/wire.py) for ``msg``: a function of
        the store, the round and what was received, so a run repeated (or resumed after a
        server restart) gets the same replies and ends with the same model."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

        from common.exchange import wire

        kind = msg.metadata.message_type
        rng = np.random.default_rng([zlib.crc32(self.store_id.encode()), zlib.crc32(f"{kind}/{server_round}".encode())])
        store = ConfigRecord({"store-id": self.store_id, "accountant": "prv"})
        if kind.startswith("train"):
            sent = content.array_records[wire.TRAIN_ARRAYS]
            arrays = ArrayRecord({k: Array((v.numpy() + 1e-4 * rng.standard_normal(v.shape)).astype(v.numpy().dtype))
                                  for k, v in sent.items()})
            metrics = MetricRecord({"num-examples": 150, "epsilon": 0.0, "delta": 1e-6, "noise-multiplier": 0.0,
                                    "rounds-trained": 0, "epsilon-budget": 8.0})
            return Message(RecordDict({wire.TRAIN_ARRAYS: arrays, "metrics": metrics, "store": store}), reply_to=msg)
        if kind == wire.EXPLORE_MESSAGE:
            release = rng.standard_normal(self.release_length)
            metrics = MetricRecord({"epsilon": 0.0, "delta": 1e-6, "noise-multiplier": 1.0, "epsilon-budget": 8.0})
            return Message(RecordDict({wire.EXPLORE_ARRAYS: ArrayRecord({"release": Array(release)}),
                                       "metrics": metrics, "store": ConfigRecord({"store-id": self.store_id})}),
                           reply_to=msg)
        if kind == wire.MODEL_MESSAGE:
            claimed = str(content.config_records["config"].get("hash", ""))
            return Message(RecordDict({"store": ConfigRecord({"store-id": self.store_id, "model-hash": claimed})}),
                           reply_to=msg)
        return Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason(
            self.store_id, f"lightweight bench client: does not answer {kind}")), reply_to=msg)


def serve(spec: dict[str, Any], stats_path: Path) -> None:
    """Run the clients of ``spec`` until SIGTERM, rewriting ``stats_path`` every second."""
    from common.data.storefiles import atomic_write_text

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stats = Stats()
    stores = [LightStore(s["store_id"], spec["address"], Path(spec["ca_cert"]), Path(s["private_key"]),
                         int(spec["release_length"]), stats, s.get("late")) for s in spec["stores"]]
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True, name=s.store_id) for s in stores]
    for thread in threads:
        thread.start()
    while not stop.wait(STATS_EVERY_S):
        atomic_write_text(stats_path, json.dumps(stats.snapshot()))
    for thread in threads:
        thread.join(timeout=10)
    atomic_write_text(stats_path, json.dumps({**stats.snapshot(), "stopped": True}))


if __name__ == "__main__":
    serve(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
