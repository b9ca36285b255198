"""Targeted fixes to Flower 1.41's simulation engine, applied by :func:`simulate`.

1. The poller (``vce_api.add_messages_to_queue``) asks the link state every 0.1 s, for
   *each* simulated node in turn, for that node's next message; the in-memory link state
   answers by checking *every* stored message. With N stores and N messages in flight a
   round costs N² checks per tick, all round long: at 500 stores one core of the driver
   does nothing else. The replacement keeps Flower's semantics (same calls, same order, at
   most one message per node per tick) but first reads, in one pass, which nodes have an
   undelivered message and asks only for those; and it ticks every :data:`TICK_S`.
2. Flower's worker threads and reply injector wait on their queues with 1 s timeouts, and
   only look at the stop event between waits: every run's shutdown waited up to 1 s for
   them. The replacements wait :data:`TICK_S`.
3. The ServerApp's grid polls for replies every 0.1 s; at each phase boundary of a round
   that is time nobody works. It polls every :data:`TICK_S`, and a fatal fault of the
   simulation (:data:`simulations.engine.backend.ABORT`) ends its wait with that fault
   instead of the round timeout (3600 s by default).
4. The Ray backend becomes :class:`simulations.engine.backend.SimBackend`.

Each patched function's source is hashed (:data:`PATCHED`); when Flower is not 1.41 or any
of them differs, nothing is patched and Flower's own code runs (slower, same results).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
import traceback
from logging import ERROR
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

TICK_S = 0.02

# "module:qualname" -> sha256 of the source of Flower 1.41's function this module replaces
# or relies on. A Flower upgrade that changes any of them turns the patches off (and fails
# tests/test_flower_patches.py, so someone re-reads the new code).
PATCHED = {
    "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue":
        "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a",
    "flwr.server.superlink.fleet.vce.vce_api:worker":
        "60f308688ba34fb5bc942ac68c1d97be61b2010e8d4c3983833f646c5c038157",
    "flwr.server.superlink.fleet.vce.vce_api:put_message_into_state":
        "3622eb5bfcd9cd1a4cef3b1d5b8250a07af41a9439ea0379e0459d62e6fa5b35",
    "flwr.server.superlink.fleet.vce.vce_api:run_api":
        "f85c0cd6e902752f455c00ab9c7212c1cd94a8c681fa9bf294ba967463390898",
    "flwr.superlink.grid.inmemory_grid:InMemoryGrid.__init__":
        "028fa3ed6b4181bb6685e4d7f940fcfcc218b9eaeed379d6b4cceb7b300bb410",
    "flwr.superlink.grid.inmemory_grid:InMemoryGrid.pull_messages":
        "71c93f1988c54741f065420799e702d3b95cadeb65feff7f7f7471ccf2a98cee",
    "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend":
        "2ad67054433feddffb8547bb6a992f62ee99f934d0b0d0d24c947a46304e8bfe",
    "flwr.simulation.ray_transport.ray_actor:VirtualClientEngineActor.run":
        "a87502a00b99224d9733ec81e909efa1c07c616242b47c692d366015393ad194",
}

_ORIGINAL: dict[str, Any] = {}


def _resolve(name: str) -> Any:
    import importlib

    if name in _ORIGINAL:  # already replaced by apply(): the original is what was checked
        return _ORIGINAL[name]

    module, qualname = name.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def source_hash(name: str) -> str:
    """sha256 of the source of ``module:qualname`` as installed."""
    return hashlib.sha256(inspect.getsource(_resolve(name)).encode()).hexdigest()


def changed() -> list[str]:
    """The patched functions whose installed source is not the one these patches were
    written against (empty when all match)."""
    return [name for name, digest in PATCHED.items() if source_hash(name) != digest]


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
            return _ORIGINAL["flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue"](state, queue, nodes_mapping, f_stop)
        for node_id in nodes_mapping.keys():
            if node_id in pending:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        f_stop.wait(TICK_S)
    return None


def worker(messageins_queue: Queue, messageres_queue: Queue, node_info_store: dict, backend: Any,
           f_stop: threading.Event, metrics: Any) -> None:
    """Flower's worker thread (vce_api.worker) with a short queue wait; same replies."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log

    while not f_stop.is_set():
        out_mssg, message, started = None, None, None
        try:
            message = messageins_queue.get(timeout=TICK_S)
            node_id = message.metadata.dst_node_id
            context = node_info_store[node_id].retrieve_context(run_id=message.metadata.run_id)
            started = time.perf_counter()
            out_mssg, updated_context = backend.process_message(message, context)
            node_info_store[node_id].update_context(message.metadata.run_id, context=updated_context)
        except Empty:
            pass
        except Exception as ex:  # as Flower: a failed task becomes an error reply
            log(ERROR, ex)
            log(ERROR, traceback.format_exc())
            if isinstance(ex, ClientAppException):
                code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            elif isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            else:
                code = ErrorCode.UNKNOWN
            out_mssg = Message(Error(code=code, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=message)
        finally:
            if started is not None:
                metrics.add_clientapp_runtime(time.perf_counter() - started)
            if out_mssg:
                out_mssg.metadata.__dict__["_message_id"] = str(uuid4())
                messageres_queue.put(out_mssg)


def put_message_into_state(state: Any, queue: Queue, f_stop: threading.Event) -> None:
    """Flower's reply injector with a short queue wait."""
    while not f_stop.is_set():
        try:
            state.store_message_res(queue.get(timeout=TICK_S))
        except Empty:
            pass


def _grid_init(self: Any, state_factory: Any, pull_interval: float = TICK_S) -> None:
    _ORIGINAL["flwr.superlink.grid.inmemory_grid:InMemoryGrid.__init__"](self, state_factory, pull_interval=min(pull_interval, TICK_S))


def _grid_pull(self: Any, message_ids: Any) -> Any:
    from simulations.engine.backend import ABORT, FATAL

    if ABORT.is_set():
        raise SimulationAborted(FATAL[0] if FATAL else "the simulation was aborted")
    return _ORIGINAL["flwr.superlink.grid.inmemory_grid:InMemoryGrid.pull_messages"](self, message_ids)


class SimulationAborted(RuntimeError):
    """A fatal fault of the simulation machinery (not of a store), raised in the ServerApp."""


def apply() -> bool:
    """Install the patches in Flower's simulation engine; True when installed."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not str(getattr(flwr, "__version__", "")).startswith("1.41") or changed():
        return False
    from simulations.engine.backend import SimBackend

    if not _ORIGINAL:
        vce, grid = "flwr.server.superlink.fleet.vce.vce_api:", "flwr.superlink.grid.inmemory_grid:InMemoryGrid."
        _ORIGINAL.update({
            vce + "add_messages_to_queue": vce_api.add_messages_to_queue, vce + "worker": vce_api.worker,
            vce + "put_message_into_state": vce_api.put_message_into_state,
            grid + "__init__": InMemoryGrid.__init__, grid + "pull_messages": InMemoryGrid.pull_messages,
            "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend": raybackend.RayBackend,
        })
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.worker = worker
    vce_api.put_message_into_state = put_message_into_state
    InMemoryGrid.__init__ = _grid_init
    InMemoryGrid.pull_messages = _grid_pull
    raybackend.RayBackend = SimBackend
    return True
