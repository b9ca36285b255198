"""``storefed bench deploy``: what a round costs one SuperLink as the chain grows.

Per case of N stores, on loopback: a SuperLink with TLS and SuperNode authentication (the
command line of ``storefed local-deploy``), N registered store keys, ``real`` real store daemons
(SuperNode in process isolation + storefed's executor, training with DP-SGD on a generated store)
and N − real lightweight clients (simulations/bench/fleet_clients.py: the real Fleet API and
message sizes, no training). One signed run of ``rounds`` rounds through ``flwr run`` — the
real ServerApp, strategy and explore release — then every process is stopped by pid.

Per round it reports the ServerApp's own round time, the CPU seconds the SuperLink and the
ServerApp spent in it (from /proc), their peak resident memory, the Fleet API payload bytes
the lightweight clients sent and received, and ``server_overhead_s``: the round time minus
the slowest store's own time (a lightweight client's from message pulled to reply built; a
real daemon's, the CPU seconds its executor used in the round, a lower bound of its wall time).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data.storefiles import DataError, atomic_write_text
from simulations.bench.proc_sampler import Sampler
from simulations.deploy import local_deploy
from simulations.deploy.processes import BIN, Processes, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]  # the storefed app `flwr run` packages
CASE_KEYS = ("stores", "real_daemons", "round_s", "server_overhead_s", "superlink_peak_mb", "serverapp_peak_mb",
             "failures")
DATABASES = ("memory", "file")


def register_keys(flwr_home: Path, keys: dict[str, Path]) -> dict[str, int]:
    """Register each store's public key through the Control API, in this process (a
    ``flwr supernode register`` per key costs a CLI start-up: minutes for 500 keys)."""
    from cryptography.hazmat.primitives import serialization
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    import contextlib

    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)  # Flower reads the connection from FLWR_HOME/config.toml
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Flower prints the connection it uses; stdout is --json's
            client = init_http_client_from_connection(read_superlink_connection(local_deploy.FEDERATION))
        try:
            ids = {}
            for store, public in keys.items():
                key = serialization.load_ssh_public_key(public.read_bytes())
                response = client.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key), name=store))
                if not response.node_id:
                    raise DataError(f"the SuperLink did not register store {store}'s key")
                ids[store] = int(response.node_id)
            return ids
        finally:
            client.close()
    finally:
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


def _classify(pid: int, cmdline: str) -> str:
    return "serverapp" if "flwr-serverapp" in cmdline else "superlink"


def _merge_stats(paths: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"activated": 0, "requests": {}, "bytes_out": {}, "bytes_in": {}, "handled": [],
                              "errors": []}
    for path in paths:
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        merged["activated"] += part["activated"]
        for key in ("requests", "bytes_out", "bytes_in"):
            for method, n in part[key].items():
                merged[key][method] = merged[key].get(method, 0) + n
        merged["handled"] += part["handled"]
        merged["errors"] += part["errors"]
    return merged


def _requests_between(handled: list[dict], start: float, end: float) -> list[dict]:
    return [h for h in handled if start <= h["received"] <= end]


@dataclass
class Loopback:
    """One deployment on loopback: files, keys, the SuperLink's command line, the stores' processes."""

    work: Path
    stores: int
    real_ids: list[str]
    light_ids: list[str]
    database: str
    procs: Processes = field(init=False)
    stats_paths: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        from client.daemon.node_key import make_node_key
        from common.data.dataset import ItemIndex
        from common.data.storefiles import read_catalog, write_chain
        from common.data.synth import ChainSpec, generate_chain
        from server.certs import make_dev_pki
        from server.operator_key import make_operator_key

        work = self.work
        work.mkdir(parents=True)
        self.chain = work / "chain"
        real = len(self.real_ids)
        write_chain(generate_chain(ChainSpec(stores=max(real, 1), members=150 * max(real, 1), items=300,
                                             categories=8, brands=20, seed=1)), self.chain)
        items = ItemIndex.from_catalog(read_catalog(self.chain))
        self.release_length = items.n_items + items.n_categories ** 2  # server/explore_round.py checks it
        self.server = work / "server"
        self.server.mkdir()
        shutil.copy(self.chain / "catalog.csv", self.server / "catalog.csv")
        self.pki = make_dev_pki(work / "certs")
        self.keys = {s: make_node_key(work / "store-keys", s) for s in (*self.real_ids, *self.light_ids)}
        self.operator_private, self.operator_public = make_operator_key(work / "operator")
        self.home = work / "flwr-home"
        self.home.mkdir()
        self.port = free_port()
        atomic_write_text(self.home / "config.toml",
                          f'[superlink]\ndefault = "{local_deploy.FEDERATION}"\n\n'
                          f'[superlink.{local_deploy.FEDERATION}]\naddress = "127.0.0.1:{self.port}"\n'
                          f'root-certificates = "{self.pki["ca_cert"]}"\n')
        self.env = local_deploy.flower_env(self.home)
        self.procs = Processes(work / "logs", self.env)
        self.db = ":flwr-in-memory:" if self.database == "memory" else str(self.home / "superlink.db")

    def start_superlink(self, name: str = "superlink") -> Any:
        """The SuperLink (again, after a restart: same port, same state database)."""
        link = self.procs.start(name, local_deploy.superlink_argv(self.port, self.pki, Path(self.db)))
        wait_for(lambda: "Uvicorn running on https://" in link.text() or link.popen.poll() is not None, 120,
                 "the SuperLink to listen")
        if link.popen.poll() is not None:
            raise DataError(f"the SuperLink exited; see {link.log}")
        return link

    def start_stores(self, workers: int, late: dict[str, dict[str, float]], timeout_s: float) -> None:
        """Register every key, start the real daemons and the lightweight clients, wait for all."""
        register_keys(self.home, {s: self.keys[s][1] for s in self.keys})
        for store in self.real_ids:
            runtime = free_port()
            (self.work / "nodes" / store).mkdir(parents=True)
            self.procs.start(store, local_deploy.supernode_argv(
                f"127.0.0.1:{self.port}", self.pki["ca_cert"], self.keys[store][0], runtime,
                local_deploy.store_node_config(self.chain / "stores" / store, self.chain, self.operator_public)),
                env={"FLWR_HOME": str(self.work / "nodes" / store)})
            self.procs.start(f"{store}-exec", local_deploy.store_exec_argv(runtime))
        per_worker = max(1, -(-len(self.light_ids) // max(1, workers)))
        for w, first in enumerate(range(0, len(self.light_ids), per_worker)):
            spec = {"address": f"127.0.0.1:{self.port}", "ca_cert": str(self.pki["ca_cert"]),
                    "release_length": self.release_length,
                    "stores": [{"store_id": s, "private_key": str(self.keys[s][0]), "late": late.get(s)}
                               for s in self.light_ids[first:first + per_worker]]}
            spec_path, stats_path = self.work / f"light-{w}.json", self.work / f"light-{w}.stats.json"
            spec_path.write_text(json.dumps(spec))
            self.stats_paths.append(stats_path)
            self.procs.start(f"light-{w}", [sys.executable, "-m", "simulations.bench.fleet_clients",
                                            str(spec_path), str(stats_path)], env={"PYTHONPATH": str(ROOT)})
        wait_for(lambda: self.light()["activated"] >= len(self.light_ids)
                 and all("SuperNode ID:" in self.procs.procs[s].text() for s in self.real_ids)
                 and all("serving storefed" in self.procs.procs[f"{s}-exec"].text() for s in self.real_ids),
                 timeout_s, f"{self.stores} stores to connect")

    def light(self) -> dict[str, Any]:
        return _merge_stats(self.stats_paths)

    def settings(self, rounds: int, out_dir: Path, timeout_s: float, round_timeout_s: float | None = None) -> str:
        return (f"data-dir='{self.server}' stores={self.stores} rounds={rounds} fraction-evaluate=0.0 "
                f"min-stores=1 node-wait-s={timeout_s} round-timeout-s={round_timeout_s or timeout_s} "
                f"update-norm-factor=0.0 target-epsilon=8.0 out-dir='{out_dir}'")

    def start_run(self, name: str, settings: str) -> Any:
        """A run signed with the operator key (the real daemons refuse any other), as ``storefed train``."""
        from server.train import signed_run_config

        argv = [str(BIN / "flwr"), "run", str(ROOT), local_deploy.FEDERATION, "--stream"]
        for override in signed_run_config(settings, operator_key=self.operator_private, app=ROOT):
            argv += ["--run-config", override]
        return self.procs.start(name, argv)

    def status(self, run: Any) -> str:
        """Flower's status of the run ``run`` started."""
        from server.train import run_status

        run_id = next((line.rsplit(" ", 1)[1] for line in run.text().splitlines()
                       if "Successfully started run" in line), None)
        return run_status(self.env, local_deploy.FEDERATION, int(run_id)) if run_id else "not started"


def run_case(stores: int, *, rounds: int, real: int, database: str, work: Path, workers: int,
             timeout_s: float, round_timeout_s: float | None = None, straggler_s: float = 0.0) -> dict[str, Any]:
    """One case: bring everything up in ``work``, run, measure, stop every process. With
    ``straggler_s`` the last lightweight store answers the last round that many seconds late."""
    real = min(real, stores)
    light_ids = [f"L{i:04d}" for i in range(1, stores - real + 1)]
    if straggler_s and not light_ids:
        raise DataError("--straggler-s needs a lightweight store (fewer --real-daemons than --stores)")
    late = {light_ids[-1]: {str(rounds): straggler_s}} if straggler_s else {}
    deployment = Loopback(work, stores, [f"S{i:03d}" for i in range(1, real + 1)], light_ids, database)
    procs = deployment.procs
    case: dict[str, Any] = {"stores": stores, "real_daemons": real, "light_clients": len(light_ids),
                            "database": database, "rounds": rounds,
                            "stragglers": {s: v for s, v in late.items()}, "work_dir": str(work)}
    sampler = None
    timings: dict[str, float] = {}
    try:
        t = time.time()
        link = deployment.start_superlink()
        sampler = Sampler([link.pid], _classify).start()
        deployment.start_stores(workers, late, timeout_s)
        timings["connect_s"] = round(time.time() - t, 1)
        exec_pids = [procs.procs[f"{s}-exec"].pid for s in deployment.real_ids]
        daemons = Sampler(exec_pids, lambda pid, cmd: "exec").start() if exec_pids else None
        out_dir = work / "run"
        t = time.time()
        run = deployment.start_run("run", deployment.settings(rounds, out_dir, timeout_s, round_timeout_s))
        try:
            run.popen.wait(timeout=timeout_s * (rounds + 3))  # the explore release, the rounds, the final model
        except subprocess.TimeoutExpired:
            case["timed_out_after_s"] = round(time.time() - t, 1)
            procs.kill("run")
        timings["run_s"] = round(time.time() - t, 1)
        case["flower_status"] = deployment.status(run)
        sampler.stop()
        if daemons:
            daemons.stop()
        light = deployment.light()
        results_path = out_dir / "results.json"
        if not results_path.exists():
            # The run failed as a whole: no store got a round aggregated or a model (case["phases"]
            # says how far the lightweight stores got).
            case.update({"round_s": None, "server_overhead_s": None, "failures": stores,
                         "error": f"the run left no results.json (Flower: {case['flower_status']}); "
                                  f"see {work / 'logs'}"})
        else:
            results = json.loads(results_path.read_text())
            case.update(_per_round(results, sampler, daemons, light, deployment.real_ids))
            case["failed_stores"] = sorted({f["store"] for f in results.get("failures", [])})
        case["run_log"] = str(run.log)
        case["phases"] = _phases(light)
        case["superlink_peak_mb"] = round(sampler.peak_mb("superlink"), 1)
        case["serverapp_peak_mb"] = round(sampler.peak_mb("serverapp"), 1)
        case["superlink_cpu_s_total"] = round(sampler.cpu_between("superlink", sampler.samples[0][0],
                                                                  sampler.samples[-1][0]), 1)
        requests = sum(light["requests"].values())
        case["light_requests"] = light["requests"]
        case["light_requests_per_store_round"] = (round(requests / len(light_ids) / (rounds + 2), 1)
                                                  if light_ids else None)  # + explore + final model
        case["light_errors"] = light["errors"][:10]
        case["timings"] = timings
    finally:
        left = procs.stop_all()
        if sampler is not None and not sampler._stop.is_set():
            sampler.stop()
    case["left_running"] = left
    return case


def _phases(light: dict) -> dict[str, Any]:
    """Per message kind (and round), what the lightweight stores saw: how many answered, and
    the span from the first message received to the last reply sent. Read even when a run
    did not finish, to say how far it got."""
    spans: dict[str, dict[str, Any]] = {}
    for h in light["handled"]:
        key = h["type"] + (f" round {h['round']}" if h["round"] else "")
        span = spans.setdefault(key, {"answered": 0, "first_received": h["received"], "last_sent": h["sent"]})
        span["answered"] += 1
        span["first_received"] = min(span["first_received"], h["received"])
        span["last_sent"] = max(span["last_sent"], h["sent"])
    return {k: {"answered": v["answered"], "span_s": round(v["last_sent"] - v["first_received"], 1)}
            for k, v in sorted(spans.items(), key=lambda kv: kv[1]["first_received"])}


def _per_round(results: dict, sampler: Sampler, daemons: Sampler | None, light: dict,
               real_ids: list[str]) -> dict[str, Any]:
    """Round time, overhead, CPU and bytes per round; the case's figures are the rounds' means."""
    rows = []
    for r in results["per_round"]:
        if "window" not in r:
            continue
        start, end = r["window"]
        # Replies that made it into the round (a straggler's late one does not count).
        handled = [h for h in _requests_between(light["handled"], start, end)
                   if h["type"].startswith("train") and h["sent"] <= end]
        own = [h["answered"] - h["pulled"] for h in handled]
        if daemons:
            own += [daemons.cpu_between("exec", start, end) / max(1, len(real_ids))]  # per daemon, on average
        rows.append({
            "round": r["round"], "round_s": r["seconds"], "participated": r["participated"], "failed": r["failed"],
            "slowest_store_s": round(max(own, default=0.0), 2),
            "superlink_cpu_s": round(sampler.cpu_between("superlink", start, end), 1),
            "serverapp_cpu_s": round(sampler.cpu_between("serverapp", start, end), 1),
            "light_bytes_in": sum(h["bytes_pulled"] or 0 for h in handled),
            "light_bytes_out": sum(h["bytes_pushed"] for h in handled),
        })
    for row in rows:
        row["server_overhead_s"] = round(max(0.0, row["round_s"] - row["slowest_store_s"]), 2)

    def mean(key: str) -> float | None:
        return round(sum(r[key] for r in rows) / len(rows), 2) if rows else None

    return {
        "round_s": mean("round_s"), "server_overhead_s": mean("server_overhead_s"),
        "superlink_cpu_s_per_round": mean("superlink_cpu_s"), "serverapp_cpu_s_per_round": mean("serverapp_cpu_s"),
        # Server's view: out = what the lightweight stores pulled, in = what they pushed (real daemons' not counted).
        "bytes_out_per_round": mean("light_bytes_in"), "bytes_in_per_round": mean("light_bytes_out"),
        # Every store that did not do its part: a round's failure or refusal, no explore release, no final model.
        "failures": (len(results.get("failures", [])) + len(results.get("explore_prior", {}).get("failed", []))
                     + len(results.get("delivery", {}).get("failed", []))),
        "participated": [r["participated"] for r in rows],
        "explore_released": len(results.get("explore_prior", {}).get("released", [])),
        "delivered": len(results.get("delivery", {}).get("delivered", [])),
        "per_round": rows,
    }


def bench_deploy(stores: list[int], *, rounds: int = 2, real: int = 2, database: str = "memory",
                 out: Path | None = None, workers: int = 4, timeout_s: float = 600.0,
                 round_timeout_s: float | None = None, straggler_s: float = 0.0) -> dict[str, Any]:
    """Every case of ``stores``, one after another; ``{"cases": [...], ...}``."""
    if not stores or any(n < 1 for n in stores):
        raise DataError("--stores: give store counts of at least 1, e.g. 10,100,500")
    if rounds < 1:
        raise DataError("--rounds must be at least 1")
    if round_timeout_s is not None and round_timeout_s <= 0:
        raise DataError("--round-timeout must be positive")
    if straggler_s < 0:
        raise DataError("--straggler-s must be 0 or more")
    if database not in DATABASES:
        raise DataError(f"--database: one of {', '.join(DATABASES)}")
    base = Path(out) if out else Path(tempfile.mkdtemp(prefix="storefed-bench-deploy-"))
    # Stopped from outside (SIGTERM): unwind, so that each case stops every process it started.
    # The caller's handler comes back afterwards (a test calls this in-process).
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cases = []
    try:
        for n in stores:
            case = run_case(n, rounds=rounds, real=real, database=database, work=base / f"stores-{n}",
                            workers=workers, timeout_s=timeout_s, round_timeout_s=round_timeout_s,
                            straggler_s=straggler_s)
            cases.append(case)
            print(f"bench deploy: {n} stores: round {case.get('round_s')} s, overhead "
                  f"{case.get('server_overhead_s')} s, SuperLink {case.get('superlink_cpu_s_per_round')} "
                  f"CPU-s/round, failures {case.get('failures')}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return {"cases": cases, "machine": {"cores": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
            "work_dir": str(base)}


def render(result: dict[str, Any]) -> str:
    """The cases as a table (the text form of ``--json``)."""
    lines = [f"{'stores':>6} {'real':>4} {'round s':>8} {'overhead s':>10} {'SL CPU-s':>8} {'SA CPU-s':>8} "
             f"{'SL MB':>7} {'SA MB':>7} {'MB out':>7} {'MB in':>7} {'fail':>4}"]
    for c in result["cases"]:
        def num(key: str, fmt: str) -> str:
            return "-" if c.get(key) is None else format(c[key], fmt)
        lines.append(f"{c['stores']:>6} {c['real_daemons']:>4} {num('round_s', '8.1f')} "
                     f"{num('server_overhead_s', '10.1f')} {num('superlink_cpu_s_per_round', '8.1f')} "
                     f"{num('serverapp_cpu_s_per_round', '8.1f')} {c['superlink_peak_mb']:7.0f} "
                     f"{c['serverapp_peak_mb']:7.0f} {(c.get('bytes_out_per_round') or 0) / 2**20:7.1f} "
                     f"{(c.get('bytes_in_per_round') or 0) / 2**20:7.1f} {num('failures', '4d')}"
                     + (f"  {c['error']}" if c.get("error") else ""))
    lines.append("SL: the SuperLink, SA: the ServerApp; CPU seconds and MB out/in per round, peak resident MB; "
                 "overhead: round time minus the slowest store's own time")
    return "\n".join(lines)
