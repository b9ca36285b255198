"""One targeted fix to Flower 1.41's simulation engine, applied by :func:`simulate`.

Flower's simulation poller (``vce_api.add_messages_to_queue``) asks the link state every
0.1 s, for *each* simulated node in turn, for that node's next message; the in-memory link
state answers by checking *every* stored message. With N stores and N messages in flight a
round costs N² checks per tick, all round long: at 500 stores one core of the driver does
nothing else, on a 2-core machine half the simulation's compute.

The replacement keeps Flower's semantics (same calls, same order, at most one message per
node per tick) but first reads, in one pass, which nodes have an undelivered message and
asks only for those. When the link state is not the in-memory one it knows, or Flower is not
1.41, it falls back to Flower's own loop.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

_ORIGINAL: dict[str, Any] = {}


def pending_nodes(state: Any) -> set[int] | None:
    """Nodes with an undelivered message in ``state``, or None if ``state`` is unknown."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        return {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's poller, asking only nodes that have a message waiting (see module docstring)."""
    while not f_stop.is_set():
        pending = pending_nodes(state)
        if pending is None:
            return _ORIGINAL["add_messages_to_queue"](state, queue, nodes_mapping, f_stop)
        for node_id in nodes_mapping.keys():
            if node_id in pending:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        f_stop.wait(0.1)
    return None


def apply() -> bool:
    """Install the poller in Flower's simulation engine; True when installed."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if not str(getattr(flwr, "__version__", "")).startswith("1.41"):
        return False
    if "add_messages_to_queue" not in _ORIGINAL:
        _ORIGINAL["add_messages_to_queue"] = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
