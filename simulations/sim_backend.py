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
patched grid (see :mod:`simulations.flower_patches`) ends the ServerApp's wait with it.

Driver-side timings of every task are kept in :data:`TIMES` for ``storefed bench sim``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.simulation.ray_transport.ray_actor import ClientAppActor, pool_size_from_resources

DEPTH = 2  # tasks in flight per actor: one running, one waiting at the actor

ABORT = threading.Event()
FATAL: list[str] = []
# (message type, round, submitted at, replied at) per task, perf_counter seconds
TIMES: list[tuple[str, str, float, float]] = []
_LOCK = threading.Lock()


def reset() -> None:
    """Forget the previous run's fault and timings (one simulation at a time per process)."""
    ABORT.clear()
    FATAL.clear()
    TIMES.clear()


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
        self.actors = [ClientAppActor.options(**self.client_resources).remote(**self.actor_kwargs)
                       for _ in range(count)]
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
        started = time.perf_counter()
        try:
            ref = self.actors[index].run.remote(self.app_fn, message, str(partition), context)
            _, reply, updated = ray.get(ref)
        except Exception as exc:
            fatal = fault_message(exc)
            if fatal is not None:
                fail(fatal)
            raise
        finally:
            self._give_back(index)
        TIMES.append((message.metadata.message_type, _round(message), started, time.perf_counter()))
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
