"""The Ray backend of a storefed simulation: Flower's, with store tasks queued ahead on actors.

Flower's ``RayBackend`` gives each actor one task at a time: a worker thread submits a
store's task, waits for its reply, hands the reply on, and only then takes the next message,
so an actor idles for every hop in between (≈ 7 ms a task, the object store for the 645 KB
model both ways, the driver's GIL shared with the ServerApp). Here each actor has up to
``DEPTH`` tasks in flight: Ray queues the next one at the actor while it runs the current
one, so the hops overlap with training. A store goes back to the actor that served it before
when that actor has room (its prepared data and baselines are cached there), else to the
least-busy actor.

Faults that are not the ClientApp's own (an actor that died, a worker that cannot import
the app) are fatal: the first one is kept in :data:`FATAL`, :data:`ABORT` is set, and the
patched grid (see :mod:`simulations.engine.flower_patches`) ends the ServerApp's wait with it.

The round's global model crosses to the workers once per round, not once per store
(:mod:`simulations.engine.model_ref`), and the ClientApp once per actor: each actor
(:class:`StoreActor`) keeps both. With ``STOREFED_SIM_INLINE=1`` every task carries them
as Flower's backend sends them (for measuring the difference).

Driver-side timings of every task are kept in :data:`TIMES`, and where the time of each
task goes in :data:`DISPATCH`, for ``storefed bench sim``.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.simulation.ray_transport.ray_actor import (ClientAppActor, VirtualClientEngineActor,
                                                     pool_size_from_resources)

from simulations.engine.model_ref import Inbox, Outbox

DEPTH = 2  # tasks in flight per actor: one running, one waiting at the actor

ABORT = threading.Event()
FATAL: list[str] = []
# (message type, round, submitted at, replied at) per task, perf_counter seconds
TIMES: list[tuple[str, str, float, float]] = []
# (message type, driver's submit s, the actor's idle s before the task, the actor's run s,
# whether the message went with a model reference, the driver thread's CPU s to submit) per task
DISPATCH: list[tuple[str, float, float, float, bool, float]] = []
OUTBOX: list[Outbox] = []  # the run's outbox (how many global models it put)
_LOCK = threading.Lock()


def reset() -> None:
    """Forget the previous run's fault and timings (one simulation at a time per process)."""
    ABORT.clear()
    FATAL.clear()
    TIMES.clear()
    DISPATCH.clear()
    OUTBOX.clear()


def inline() -> bool:
    """Whether tasks carry the ClientApp and the model each time, as Flower's backend sends them."""
    return os.environ.get("STOREFED_SIM_INLINE", "") == "1"


def fail(message: str) -> None:
    """Record the run's first fatal fault and stop the run."""
    with _LOCK:
        if not FATAL:
            FATAL.append(message)
    ABORT.set()


def fault_message(exc: BaseException) -> str | None:
    """What a Ray error from a store task means for the run: None when it is the ClientApp's
    own error (a store's fault, reported to the server as an error reply), else the fatal
    fault, said for the user."""
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, ClientAppException):
        return None
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return ("Ray stopped a simulation worker because the machine ran low on memory; free memory "
                "or run fewer stores at once (--workers)")
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)):
        return ("a simulation worker (Ray actor) died; it may have run out of memory: run fewer "
                "stores at once (--workers) or rerun with --verbose to see Ray's log")
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, (ImportError, ModuleNotFoundError)) or "ModuleNotFoundError" in str(exc):
        return (f"a simulation worker cannot import the app ({cause}); the workers get the "
                "driver's sys.path as PYTHONPATH: run storefed from the project's environment")
    return f"a simulation worker failed outside the app: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def _round(message: Message) -> str:
    """The server round a task belongs to (Flower's strategies put it in the config)."""
    try:
        return str(int(message.content["config"]["server-round"]))
    except (KeyError, TypeError, ValueError):
        return message.metadata.group_id


@ray.remote
class StoreActor(VirtualClientEngineActor):
    """A Ray actor that runs store tasks: Flower's ClientAppActor, but the ClientApp is loaded
    once per actor (from one object in Ray's store) and a message's global model is
    fetched once per round (:class:`simulations.engine.model_ref.Inbox`)."""

    def __init__(self, on_actor_init_fn: Any = None) -> None:
        super().__init__()
        if on_actor_init_fn:
            on_actor_init_fn()
        self.app: Any = None
        self.inbox = Inbox()
        self.last_end: float | None = None

    def run_store(self, app_ref: list, message: Message, cid: str, context: Context,
                  model_ref: list) -> tuple[str, Message, Context, float, float]:
        """As ``ClientAppActor.run``: the reply and context of ``message``; then this actor's
        idle seconds before the task and its seconds in it. ``app_ref``/``model_ref``: the
        ClientApp's factory and the model, as one-element lists of Ray references (nested,
        so that Ray passes them unresolved and they are fetched only when not held here)."""
        started = time.perf_counter()
        idle = 0.0 if self.last_end is None else started - self.last_end
        try:
            message = self.inbox.resolve(message, model_ref)  # ModelRefError: the run's fault, not the store's
            try:
                if self.app is None:
                    self.app = ray.get(app_ref[0])()
                reply = self.app(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as exc:  # as Flower's actor: the app's own error
                raise ClientAppException(str(exc)) from exc
        finally:
            self.last_end = time.perf_counter()
        return cid, reply, context, idle, self.last_end - started


class SimBackend(RayBackend):
    """Flower's Ray backend with ``DEPTH`` tasks in flight per actor and sticky stores."""

    def __init__(self, backend_config: dict) -> None:
        # simulate() starts (and stops) Ray itself; only a Ray started here is stopped here.
        self.owns_ray = not ray.is_initialized()
        super().__init__(backend_config)

    def build(self, app_fn: Any) -> None:
        """Create one actor per ``client_resources`` that fit the cluster."""
        self.app_fn = app_fn
        count = pool_size_from_resources(self.client_resources)
        actor_class = ClientAppActor if inline() else StoreActor
        self.actors = [actor_class.options(**self.client_resources).remote(**self.actor_kwargs)
                       for _ in range(count)]
        self.app_ref = None if inline() else ray.put(app_fn)
        self.outbox = Outbox()
        OUTBOX[:] = [self.outbox]
        self.outbox_lock = threading.Lock()
        self.inflight = [0] * count
        self.home: dict[int, int] = {}
        self.room = threading.Condition()

    @property
    def num_workers(self) -> int:
        """Flower runs this many worker threads, each with one task in flight."""
        return len(getattr(self, "actors", [])) * DEPTH

    def is_worker_idle(self) -> bool:
        return any(n < DEPTH for n in getattr(self, "inflight", []))

    def _take(self, partition: int) -> int:
        with self.room:
            while True:
                home = self.home.get(partition)
                if home is not None and self.inflight[home] < DEPTH:
                    pick = home
                else:
                    pick = min(range(len(self.actors)), key=self.inflight.__getitem__)
                if self.inflight[pick] < DEPTH:
                    self.inflight[pick] += 1
                    self.home[partition] = pick
                    return pick
                self.room.wait(0.05)

    def _give_back(self, index: int) -> None:
        with self.room:
            self.inflight[index] -= 1
            self.room.notify()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp for ``message`` on an actor; the reply and the updated context."""
        if ABORT.is_set():
            raise RuntimeError(FATAL[0] if FATAL else "simulation aborted")
        partition = int(context.node_config[PARTITION_ID_KEY])
        index = self._take(partition)
        started, cpu = time.perf_counter(), time.thread_time()
        idle = run = float("nan")
        model: list = []
        try:
            if self.app_ref is None:
                ref = self.actors[index].run.remote(self.app_fn, message, str(partition), context)
                submitted, submit_cpu = time.perf_counter(), time.thread_time() - cpu
                _, reply, updated = ray.get(ref)
            else:
                with self.outbox_lock:
                    light, model = self.outbox.light(message)
                ref = self.actors[index].run_store.remote([self.app_ref], light, str(partition), context, model)
                submitted, submit_cpu = time.perf_counter(), time.thread_time() - cpu
                _, reply, updated, idle, run = ray.get(ref)
        except Exception as exc:
            fatal = fault_message(exc)
            if fatal is not None:
                fail(fatal)
            raise
        finally:
            self._give_back(index)
        TIMES.append((message.metadata.message_type, _round(message), started, time.perf_counter()))
        DISPATCH.append((message.metadata.message_type, submitted - started, idle, run, bool(model), submit_cpu))
        return reply, updated

    def terminate(self) -> None:
        """Stop the actors; Ray itself is stopped by whoever started it (see simulate())."""
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # already gone, or Ray already down
                pass
        if self.owns_ray:
            ray.shutdown()
