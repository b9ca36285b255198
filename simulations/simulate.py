"""The Python entry for a simulation: many stores in one process, results as a dict.

Runs the same ServerApp and ClientApp as `flwr run .` through Flower's simulation runtime
(Ray backend), with the run config given here instead of pyproject overrides.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from common.config import RunConfig
from simulations.deploy.processes import descendants


INLINE_BYTES = 2 * 1024 * 1024  # Ray passes task arguments and replies up to this size inline
RAY_ATTACH_S = 30.0  # longest wait for an existing Ray cluster to answer
STOP_S = 5.0  # longest wait for Ray's processes to end at shutdown before they are killed


class SimulationError(RuntimeError):
    """The simulation machinery failed (not a store): the message says what and what to do."""


def backend_config(*, ray_address: str | None = None, num_cpus: int | None = None,
                   verbose: bool = False) -> dict:
    """Flower's Ray backend config: one CPU per store task; a local Ray on ``num_cpus``
    cores (default: all), or, given ``ray_address`` (or ``$RAY_ADDRESS``), an existing
    Ray cluster, whose nodes then set the cores."""
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": verbose}
    address = ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        init["address"] = address  # Ray refuses num_cpus when it attaches to a cluster
    else:
        init["num_cpus"] = num_cpus or os.cpu_count() or 1
        # The 645 KB model and replies go inline with the task instead of through Ray's
        # shared-memory object store (default limit 100 KiB); only a new cluster takes it.
        # Ray would also start one idle task worker per CPU for the first driver; the
        # simulation runs only actors (their own processes), so those would hold memory
        # and compete for the cores at start-up for nothing.
        init["_system_config"] = {"max_direct_call_object_size": INLINE_BYTES, "prestart_worker_first_driver": False}
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init}


def _no_cluster(address: str) -> SimulationError:
    return SimulationError(f"no Ray cluster at {address}: start one with `ray start --head` or drop --ray-address")


def _probe(address: str, timeout: float = 3.0) -> None:
    """Raise :class:`SimulationError` unless something accepts connections at ``address``
    (host:port); Ray itself would retry a dead address for many minutes."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return  # Ray resolves these itself, and fails fast when there is nothing
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SimulationError(f"--ray-address {address!r} is not host:port (e.g. 127.0.0.1:6379, "
                              "as printed by `ray start --head`)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        raise _no_cluster(address) from None
    # Ray's GCS speaks gRPC. Something else on that port would leave ray.init retrying while
    # it holds the GIL, where no watchdog thread and no signal handler can run.
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        raise SimulationError(f"what listens at {address} is not a Ray cluster (no gRPC answer in 10 s): "
                              "give the address `ray start --head` printed, or drop --ray-address") from None
    finally:
        channel.close()


def start_ray(init_args: Mapping[str, Any]) -> None:
    """``ray.init`` with the workers' PYTHONPATH as Flower sets it, bounded in time."""
    import threading

    import ray

    address = str(init_args.get("address", ""))
    if address:
        _probe(address)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    # ray.init runs on this thread: Ray ties its daemons' lives to the thread that started
    # them (PR_SET_PDEATHSIG), so a helper thread's end would kill them. Ray retries a
    # cluster that does not answer for many minutes, so a watchdog ends the process then.
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(RAY_ATTACH_S if address else 120.0):
            what = (f"no Ray cluster answered at {address} within {RAY_ATTACH_S:.0f} s: start one with "
                    "`ray start --head` or drop --ray-address") if address else \
                "Ray did not start within 120 s; rerun with --verbose to see Ray's log"
            print(f"storefed: {what}", file=sys.stderr, flush=True)
            kill_descendants()
            os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="storefed-ray-watchdog").start()
    before = set(descendants(os.getpid()))
    try:
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **dict(init_args))
        except Exception as exc:
            # Ray gives its raylet a fixed 30 s to register (ray/_private/node.py:411); on an
            # overloaded machine that is too short once in a while: one more try, from scratch.
            if address or "timed out during startup" not in str(exc):
                raise
            stop_ray(before)
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **dict(init_args))
    except Exception as exc:
        if address:
            raise SimulationError(f"could not attach to the Ray cluster at {address} ({exc}); check it with "
                                  "`ray status` or drop --ray-address") from None
        raise SimulationError(f"could not start Ray ({type(exc).__name__}: {exc}); rerun with --verbose") from None
    finally:
        done.set()


def kill_descendants(keep: set[int] | frozenset[int] = frozenset()) -> int:
    """SIGKILL every process below this one (Ray's daemons and workers) but ``keep``; how many."""
    import signal

    pids = [p for p in descendants(os.getpid()) if p not in keep]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


def stop_ray(keep: set[int] | frozenset[int] = frozenset()) -> None:
    """``ray.shutdown``, then kill what still lives below this process but ``keep`` (the
    processes that were there before Ray)."""
    import threading

    import ray

    thread = threading.Thread(target=ray.shutdown, daemon=True, name="storefed-ray-shutdown")
    thread.start()
    thread.join(STOP_S)
    kill_descendants(keep)


class _Stop:
    """SIGTERM and Ctrl-C during a simulation: kill every process it started, then exit.

    Flower's ServerApp runs in a non-daemon thread and Ray's daemons outlive a killed
    driver, so neither a KeyboardInterrupt nor the default SIGTERM would end the run. And
    the main thread may sit in Ray's or Flower's blocking calls, where Python handlers do
    not run: the signal's number reaches a watcher thread through the wakeup fd instead."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __enter__(self) -> "_Stop":
        import threading

        self.saved: dict[int, Any] = {}
        self.wakeup = None
        if threading.current_thread() is threading.main_thread():
            import signal

            read, write = os.pipe()
            os.set_blocking(write, False)
            self.wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self.fds = (read, write)
            threading.Thread(target=self._watch, args=(read,), daemon=True, name="storefed-signals").start()
            self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: ``ray.init`` puts its own SIGTERM handler in place."""
        import signal

        if self.wakeup is not None:
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self.saved.setdefault(sig, signal.signal(sig, lambda *_: None))  # the watcher acts

    @staticmethod
    def _watch(read: int) -> None:
        import signal

        wanted = {int(getattr(signal, n)) for n in _Stop.SIGNALS}
        while True:
            try:
                data = os.read(read, 16)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in wanted:
                    name = signal.Signals(signum).name
                    print(f"storefed: {name}: stopping the simulation and its processes", file=sys.stderr,
                          flush=True)
                    kill_descendants()
                    os._exit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self.wakeup is None:
            return
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self.wakeup)
        for fd in self.fds:
            os.close(fd)


# Phases of the last simulate() call (perf_counter seconds), for `storefed bench sim`.
LAST: dict[str, float] = {}


def simulate(config: Mapping[str, Any] | None = None, *, verbose: bool = False, ray_address: str | None = None,
             num_cpus: int | None = None) -> dict:
    """Run a simulation with ``config`` (run-config keys, see :data:`common.config.DEFAULTS`).

    One simulated SuperNode per store (``stores``). Returns the results object that
    `storefed simulate --json` prints; it is also written to ``<out-dir>/results.json``.
    ``ray_address``/``num_cpus``: see :func:`backend_config`.
    Raises :class:`SimulationError` when Ray cannot be started or reached, or a worker
    died or cannot import the app; ``RuntimeError`` when the run produced no results.
    """
    import time

    started = time.perf_counter()
    address = ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _probe(address)  # before the slow imports: a wrong address is the commonest fault
    # Flower's Ray backend gives its workers the driver's sys.path as PYTHONPATH. An entry ""
    # (python -c, or a script elsewhere) would mean the *worker's* cwd, so workers could
    # import another copy of this project (e.g. an installed one): name this copy explicitly.
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Silences a Ray notice about GPU variables; this project uses no GPU.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from flwr.simulation import run_simulation

    from simulations.engine import backend as sim_backend, flower_patches

    # Flower's poller is O(stores²) per tick, its queues wait 1 s at shutdown, and its Ray
    # backend runs one task per actor at a time; see the modules.
    flower_patches.apply()
    sim_backend.reset()

    from client.client_app import create_app as client_app
    from server.server_app import create_app as server_app

    given = dict(config or {})
    if not given.get("out-dir"):
        given["out-dir"] = tempfile.mkdtemp(prefix="storefed-run-")
    cfg = RunConfig.from_mapping(given)
    out = Path(cfg["out-dir"]) / "results.json"
    out.unlink(missing_ok=True)
    if not verbose:
        # Flower warns that run_simulation is deprecated in favour of `flwr run`; both are
        # supported here (simulations/README.md), so keep the user's screen for the run's own lines.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    backend = backend_config(ray_address=ray_address, num_cpus=num_cpus, verbose=verbose)
    with _Stop() as stop:
        owns = not ray.is_initialized()
        before = set(descendants(os.getpid()))
        if owns:
            start_ray(backend["init_args"])
            stop.install()
        LAST.clear()
        LAST["started"], LAST["ray_up"] = started, time.perf_counter()
        try:
            run_simulation(
                server_app=server_app(cfg.values),
                client_app=client_app(cfg.values),
                num_supernodes=cfg["stores"],
                backend_config=backend,
                verbose_logging=verbose,
            )
        except Exception as exc:
            if sim_backend.FATAL:
                raise SimulationError(sim_backend.FATAL[0]) from None
            raise exc
        finally:
            LAST["run_done"] = time.perf_counter()
            if owns:
                stop_ray(before)
            LAST["stopped"] = time.perf_counter()
    if sim_backend.FATAL:
        raise SimulationError(sim_backend.FATAL[0])
    if not out.exists():
        raise RuntimeError("the simulation ended without results; rerun with --verbose to see Flower's log")
    results = json.loads(out.read_text())
    results["member_privacy"] = chain_member_privacy(cfg)
    from common.data.storefiles import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    return results


def chain_member_privacy(cfg: RunConfig) -> dict:
    """`member_privacy`: each person's ε over every store they trained at, from the stores'
    ledgers (all runs) and their training members — what only a simulation, which sees
    every store, can compute (see simulations.member_privacy)."""
    from client.state.ledger import read_events
    from client.policy import store_settings
    from client.store import load_store
    from common.data import contract
    from common.data.storefiles import DataError, locate, read_table, store_dirs
    from simulations.member_privacy import member_privacy

    dirs = store_dirs(cfg.chain_dir())[: cfg["stores"]]
    histories, deltas, trained, registered, budgets = {}, {}, {}, {}, []
    for part, store_dir in enumerate(dirs):
        members_file = locate(store_dir, contract.MEMBERS_FILE)
        if members_file is not None:
            registered[store_dir.name] = read_table(members_file, ("member_id",))["member_id"].str.strip().tolist()
        node_config = {"partition-id": part, "num-partitions": len(dirs)}
        try:
            store_cfg = store_settings(node_config, cfg)
            node = load_store(node_config, store_cfg)
        except DataError:
            continue  # a store that cannot load its data trained no one
        events = read_events(node.paths.state_dir, node.store_id)
        registered[node.store_id] = registered.pop(store_dir.name, [])
        histories[node.store_id] = [e.mechanism() for e in events]
        deltas[node.store_id] = min((e.delta for e in events), default=1.0)
        trained[node.store_id] = [str(m) for m in node.data.member_ids] if events else []
        budgets.append(float(store_cfg["epsilon-budget"]))
    result = member_privacy(histories, deltas, trained, registered, max(budgets, default=cfg["epsilon-budget"]),
                            cfg["accountant"])
    if not cfg["dp"]:
        result["max_epsilon"] = None  # trained without noise: unbounded (JSON has no infinity)
    return result
