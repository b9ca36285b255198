"""`storefed bench sim`: what the Flower simulation costs over the same work done plainly.

For each chain size (``stores`` stores of ``members`` members each on average, generated
once under the cache), two runs of ``rounds`` rounds, each in its own process:

* ``sim``: :func:`simulations.simulate.simulate` — Flower's simulation runtime on a local
  Ray with ``workers`` cores, the real ServerApp and ClientApp;
* ``plain``: the same store work without Flower or Ray — ``workers`` Python processes, each
  looping over a fixed share of the stores; per round each store does what the ClientApp
  does (budget check with the accountant, DP-SGD, ledger event; then evaluation of the new
  global model with the baselines and audience), and the parent averages (FedAvg).

Same data, σ, seeds, epochs and cores, so ``overhead = sim_s / plain_s − 1`` is the cost of
the federation machinery. Wall times include process start, data loading and (sim) Ray's
start. Peak memory: the largest sum of proportional set sizes (PSS, shared pages split)
over the run's process tree, sampled every 0.2 s. Bytes: what a store's train reply holds
in Flower's wire format, from the strategy's count. CPU: user + system seconds of every
process of the run's tree (sampled with the memory, so a process living < 0.2 s is missed),
next to wall time because a shared machine's load distorts wall time more.

σ is fixed (``noise-multiplier``) rather than calibrated per store size: calibration is
per-process setup, the same in both runs, and takes minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from simulations.deploy.processes import descendants

TARGET_OVERHEAD = 0.30  # end to end, with a cold Ray
TARGET_STEADY_OVERHEAD = 0.15  # per round after the first
TARGET_MEMORY_RATIO = 1.2  # peak memory, simulation / plain loops
MEMORY_LIMIT_MB = 24 * 1024  # 500 stores must fit this
TARGET_FROM_STORES = 100
MEMBERS_PER_STORE = 100
QUICK = dict(stores=[2], rounds=1, members=60, workers=1)
SIGMA = 1.0


def chain_for(stores: int, members: int, seed: int = 0, default: bool = False) -> Path:
    """The benchmark chain (generated once under the cache): ``stores`` × ``members``, or
    with ``default`` the chain `storefed simulate` generates for ``stores`` stores."""
    from common.config import cache_root
    from common.data.storefiles import ensure_generated_chain
    from common.data.synth import ChainSpec, default_spec

    if default:
        path = cache_root() / "bench-sim" / f"chain-seed{seed}-stores{stores}-default"
        ensure_generated_chain(path, default_spec(stores, seed))
        return path
    path = cache_root() / "bench-sim" / f"chain-seed{seed}-stores{stores}-members{members}"
    ensure_generated_chain(path, ChainSpec(stores=stores, members=stores * members, seed=seed,
                                           min_store_members=min(100, members)))
    return path


def run_config(stores: int, rounds: int, chain: Path, work: Path, extra: dict | None = None) -> dict:
    """Run config of both runs (fresh ledgers under ``work``)."""
    return {"stores": stores, "rounds": rounds, "data-dir": str(chain), "out-dir": str(work / "out"),
            "state-dir": str(work / "state"), "noise-multiplier": SIGMA, "node-wait-s": 600.0,
            # Time, not privacy, is measured: no store may decline a round for its budget.
            "epsilon-budget": 1000.0,
            # The same work on both sides: the plain loops evaluate the global model, so the
            # simulation's stores do not fit their local layer (it would add a fit per store
            # in the last round and report the served model's NDCG against the global one's).
            "local-layer": False,
            **(extra or {})}


# --- the plain run -------------------------------------------------------------------------

def _store_train(part: int, server_round: int, state: dict, cfg) -> tuple[int, dict]:
    """One store's train task as the ClientApp runs it (client.dp_round), without Flower."""
    import torch

    from client.dp_round import Trained, train_round
    from client.policy import store_settings
    from client.store import load_store
    from common.learning.model import Recommender

    node_config = {"partition-id": part, "num-partitions": cfg["stores"]}
    cfg = store_settings(node_config, cfg)
    node = load_store(node_config, cfg)
    model = Recommender(node.data.items, cfg.model_config())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    outcome = train_round(node, cfg, model, run_id="plain", server_round=server_round)
    if not isinstance(outcome, Trained):
        raise RuntimeError(f"store {node.store_id} declined round {server_round}: {outcome.info['reason']}")
    return int(outcome.metrics["num-examples"]), {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _store_evaluate(part: int, state: dict, cfg) -> float:
    """One store's evaluate task as the ClientApp runs it (model, baselines, audience)."""
    import torch

    from client.client_app import _baselines
    from client.store import load_store
    from common.evaluation.evaluation import evaluate_audience, evaluate_model
    from common.learning.model import Recommender

    node = load_store({"partition-id": part, "num-partitions": cfg["stores"]}, cfg)
    model = Recommender(node.data.items, cfg.model_config())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    metrics = evaluate_model(model, node.data)
    _baselines(node)
    evaluate_audience(model, node.data)
    return float(metrics["ndcg@10"])


def _plain_worker(conn, parts: list[int], config: dict) -> None:
    """A worker process: per request, its stores' train (or evaluate) tasks in a loop."""
    import torch

    from common.config import RunConfig

    torch.set_num_threads(1)  # as the ClientApp: one store per core
    cfg = RunConfig.from_mapping(config)
    while (request := conn.recv()) is not None:
        kind, server_round, state = request
        if kind == "train":
            conn.send([_store_train(p, server_round, state, cfg) for p in parts])
        else:
            conn.send([_store_evaluate(p, state, cfg) for p in parts])


def run_plain(config: dict, workers: int) -> dict:
    """The plain run: FedAvg over ``workers`` processes of plain loops; returns timings."""
    import multiprocessing as mp

    import torch

    from common.config import RunConfig
    from common.data.dataset import ItemIndex
    from common.learning.model import Recommender
    from common.data.storefiles import read_catalog

    started = time.perf_counter()
    cfg = RunConfig.from_mapping(config)
    torch.manual_seed(cfg["seed"])
    model = Recommender(ItemIndex.from_catalog(read_catalog(cfg.chain_dir())),
                        cfg.model_config())
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    stores = cfg["stores"]
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for w in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_plain_worker, args=(child, list(range(w, stores, workers)), dict(config)))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    ndcg, ends = [], []
    first = time.perf_counter()  # the workers import and prepare their stores in round 1, as actors do
    try:
        for server_round in range(1, cfg["rounds"] + 1):
            for pipe in pipes:
                pipe.send(("train", server_round, state))
            replies = [r for pipe in pipes for r in pipe.recv()]
            total = sum(n for n, _ in replies)
            state = {k: (sum(n * s[k].astype(np.float64) for n, s in replies) / total).astype(state[k].dtype)
                     for k in state}
            for pipe in pipes:
                pipe.send(("evaluate", server_round, state))
            ndcg.append(float(np.mean([v for pipe in pipes for v in pipe.recv()])))
            ends.append(time.perf_counter())
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join()
    done = time.perf_counter()
    return {"seconds": done - started, "ndcg@10": ndcg, **phases(started, first, ends, done)}


def phases(started: float, first: float, ends: list[float], done: float,
           prior_end: float | None = None) -> dict:
    """Start-up (to the first store task), the explore-prior step before round 1 if there
    was one (``prior_s``, 0 otherwise), each round's wall time, shutdown (after the last)."""
    begin = first if prior_end is None else prior_end
    rounds = [b - a for a, b in zip([begin] + ends[:-1], ends)]
    return {"startup_s": first - started, "prior_s": begin - first, "round_s": rounds,
            "shutdown_s": done - (ends[-1] if ends else begin)}


def run_sim(config: dict, workers: int, ray_address: str | None = None) -> dict:
    """The Flower simulation; returns timings and the bytes a store sent per round.

    Phases from the driver's clock: start-up until the first store task is handed to Ray;
    a round ends with the last reply of its tasks; shutdown is the rest (Flower's teardown,
    ``ray.shutdown``)."""
    from simulations.engine import backend as sim_backend
    from simulations.simulate import LAST, simulate

    started = time.perf_counter()
    results = simulate(config, num_cpus=None if ray_address else workers, ray_address=ray_address)
    done = time.perf_counter()
    per_store = [r["bytes_per_store"] for r in results["per_round"] if "bytes_per_store" in r]
    by_round: dict[int, float] = {}
    for _, group, _, end in sim_backend.TIMES:
        if str(group).isdigit():
            by_round[int(group)] = max(by_round.get(int(group), 0.0), end)
    first = min((t[2] for t in sim_backend.TIMES), default=LAST.get("ray_up", started))
    # Round 0 is the stores' one explore-prior release (DESIGN §5.3): timed apart, so
    # round_s compares like with like against the plain loop, which has no such step.
    prior_end = by_round.pop(0, None)
    return {"seconds": done - started, "dispatch_ms": dispatch_ms(sim_backend.DISPATCH),
            "models_put": sim_backend.OUTBOX[0].puts if sim_backend.OUTBOX else None, "ndcg@10": [r["ndcg@10"] for r in results["per_round"]],
            "bytes_per_store_round": int(np.mean(per_store)) if per_store else 0,
            "ray_start_s": LAST["ray_up"] - LAST["started"], "ray_stop_s": LAST["stopped"] - LAST["run_done"],
            **phases(started, first, [by_round[r] for r in sorted(by_round)], done, prior_end)}


def dispatch_ms(tasks: list[tuple]) -> dict:
    """Per message type, medians in ms over the run's store tasks: ``submit``, the driver's
    time to hand a task to Ray (serializing it under the GIL the ServerApp shares), wall and
    (``submit_cpu``) the submitting thread's CPU time, less sensitive to a loaded machine; ``idle``,
    an actor's wait between the end of its previous task and the start of this one (NaN
    when tasks go as Flower sends them, whose actor does not time itself); ``run``, the task
    itself at the actor; ``by_reference``, the share of tasks whose model went by reference."""
    out = {}
    for kind in sorted({t[0] for t in tasks}):
        rows = [t for t in tasks if t[0] == kind]
        idle = [t[2] for t in rows[1:] if np.isfinite(t[2])]  # an actor's first task has no predecessor

        def median(values: list[float]) -> float | None:
            return round(float(np.median(values)) * 1000, 2) if values else None

        out[kind] = {"tasks": len(rows), "submit": median([t[1] for t in rows]),
                     "submit_cpu": median([t[5] for t in rows]), "idle": median(idle),
                     "run": median([t[3] for t in rows if np.isfinite(t[3])]),
                     "by_reference": round(sum(bool(t[4]) for t in rows) / len(rows), 3)}
    return out


def steady_overhead(sim_rounds: list[float], plain_rounds: list[float]) -> float | None:
    """Simulation vs plain loops per round after the first (None with fewer than 2 rounds)."""
    if len(sim_rounds) < 2 or len(plain_rounds) < 2:
        return None
    return float(np.mean(sim_rounds[1:]) / np.mean(plain_rounds[1:]) - 1)


# --- measurement ------------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    return [root, *descendants(root)]


def _cpu_ticks(pid: int) -> int:
    """User + system clock ticks a live process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


def measured(call: str, env: dict | None = None) -> dict:
    """Run ``call`` (an expression of this module) in a new process; its JSON result plus
    the peak PSS of its process tree."""
    code = f"import json; from simulations.bench.sim import *; print('RESULT ' + json.dumps({call}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    peak = 0.0
    ticks: dict[int, int] = {}  # last CPU reading of every process seen in the tree
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            pids = _tree(proc.pid)
            peak = max(peak, _pss_mb(pids))
            for pid in pids:
                ticks[pid] = max(ticks.get(pid, 0), _cpu_ticks(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark run failed ({call}):\n{err[-3000:]}")
    cpu = sum(ticks.values()) / os.sysconf("SC_CLK_TCK")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT "):]), "peak_mb": peak, "cpu_s": cpu}


def bench_sim(stores_list: list[int], rounds: int = 3, members: int = MEMBERS_PER_STORE, workers: int = 0,
              quick: bool = False, extra: dict | None = None, sizes: tuple[str, ...] = ("small",),
              ray_address: str | None = None, memory_stores: int = 0) -> dict:
    """The `storefed bench sim --json` object: one case per store size and chain size.

    ``sizes``: "small" (``members`` a store, the benchmark's chain) and/or "default" (the
    store size of the default generated chain). ``ray_address``: the simulation attaches to
    that running Ray instead of starting one (start-up then excludes Ray's).
    ``memory_stores``: also a simulation alone of that many small stores for one round, for
    its peak memory against :data:`MEMORY_LIMIT_MB` (``memory_check``; skipped when 0 or
    when a case of that many stores or more already ran)."""
    from common.data.synth import MEMBERS_PER_STORE as DEFAULT_MEMBERS

    if quick:
        stores_list, rounds, members, workers = QUICK["stores"], QUICK["rounds"], QUICK["members"], QUICK["workers"]
        sizes = ("small",)
    workers = workers or os.cpu_count() or 1
    cases = []
    for size in sizes:
        size_members = members if size == "small" else DEFAULT_MEMBERS
        for stores in stores_list:
            chain = chain_for(stores, size_members, default=size == "default")
            cases.append(_case(stores, rounds, size, size_members, chain, workers, extra, ray_address))
    check = None
    if memory_stores > 0 and not quick and not any(c["stores"] >= memory_stores for c in cases):
        check = memory_check(memory_stores, members, workers, extra, ray_address)
    return {"cases": cases, "memory_check": check, "rounds": rounds, "members_per_store": members, "workers": workers,
            "quick": quick, "ray": "attached" if ray_address else "cold",
            "targets": {"overhead": TARGET_OVERHEAD, "from_stores": TARGET_FROM_STORES,
                        "steady_overhead": TARGET_STEADY_OVERHEAD, "memory_ratio": TARGET_MEMORY_RATIO,
                        "memory_limit_mb": MEMORY_LIMIT_MB}}


def _case(stores: int, rounds: int, size: str, members: int, chain: Path, workers: int, extra: dict | None,
          ray_address: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="storefed-bench-sim-") as tmp:
        sim_cfg = run_config(stores, rounds, chain, Path(tmp) / "sim", extra)
        plain_cfg = run_config(stores, rounds, chain, Path(tmp) / "plain", extra)
        # Each run prepares the stores' data from scratch (its own prepared-data cache).
        plain = measured(f"run_plain({plain_cfg!r}, {workers})", {"STOREFED_PREPARED_DIR": f"{tmp}/prep-plain"})
        sim = measured(f"run_sim({sim_cfg!r}, {workers}, {ray_address!r})", {"STOREFED_PREPARED_DIR": f"{tmp}/prep-sim"})
    steady = steady_overhead(sim["round_s"], plain["round_s"])
    return {
        "stores": stores, "size": size, "members_per_store": members,
        "sim_s": round(sim["seconds"], 2), "plain_s": round(plain["seconds"], 2),
        "overhead": round(sim["seconds"] / plain["seconds"] - 1, 3),
        "steady_overhead": None if steady is None else round(steady, 3),
        "startup_s": round(sim["startup_s"], 2), "plain_startup_s": round(plain["startup_s"], 2),
        "shutdown_s": round(sim["shutdown_s"], 2), "plain_shutdown_s": round(plain["shutdown_s"], 2),
        "prior_s": round(sim["prior_s"], 2),
        "ray_start_s": round(sim["ray_start_s"], 2), "ray_stop_s": round(sim["ray_stop_s"], 2),
        "round_s": [round(x, 2) for x in sim["round_s"]], "plain_round_s": [round(x, 2) for x in plain["round_s"]],
        "s_per_store_round": round(sim["seconds"] / (stores * rounds), 4),
        "task_core_s": round(sim["seconds"] * workers / (2 * stores * rounds), 4),
        "bytes_per_store_round": sim["bytes_per_store_round"],
        "peak_rss_mb": round(sim["peak_mb"], 1), "plain_peak_rss_mb": round(plain["peak_mb"], 1),
        # CPU seconds of each run's whole process tree: less sensitive than wall time to
        # other jobs on a shared machine.
        "sim_cpu_s": round(sim["cpu_s"], 1), "plain_cpu_s": round(plain["cpu_s"], 1),
        "cpu_overhead": round(sim["cpu_s"] / plain["cpu_s"] - 1, 3) if plain["cpu_s"] > 0 else None,
        # Where a store task's time goes (ms, medians; see dispatch_ms) and how many global
        # models crossed to the workers.
        "dispatch_ms": sim["dispatch_ms"], "models_put": sim["models_put"],
        "ndcg@10": sim["ndcg@10"][-1] if sim["ndcg@10"] else None,
        "plain_ndcg@10": plain["ndcg@10"][-1] if plain["ndcg@10"] else None,
    }


def memory_check(stores: int, members: int, workers: int, extra: dict | None, ray_address: str | None) -> dict:
    """Peak memory of a simulation of ``stores`` small stores, one round (every store's data
    prepared, trained and evaluated once), against :data:`MEMORY_LIMIT_MB`; no plain run."""
    chain = chain_for(stores, members)
    with tempfile.TemporaryDirectory(prefix="storefed-bench-sim-") as tmp:
        cfg = run_config(stores, 1, chain, Path(tmp) / "sim", extra)
        sim = measured(f"run_sim({cfg!r}, {workers}, {ray_address!r})", {"STOREFED_PREPARED_DIR": f"{tmp}/prep-sim"})
    return {"stores": stores, "rounds": 1, "members_per_store": members, "sim_s": round(sim["seconds"], 2),
            "peak_rss_mb": round(sim["peak_mb"], 1), "memory_limit_mb": MEMORY_LIMIT_MB,
            "fits": sim["peak_mb"] < MEMORY_LIMIT_MB, "sim_cpu_s": round(sim["cpu_s"], 1)}


def verdicts(result: dict) -> list[str]:
    """PASS/FAIL lines: overheads, memory and NDCG from 100 stores on, linear growth, 500
    stores' peak memory."""
    t, cases = result["targets"], result["cases"]
    lines = []
    for c in cases:
        if c["stores"] >= t["from_stores"]:
            at = f"at {c['stores']} stores of {c.get('members_per_store', '?')} members"
            ok = c["overhead"] <= t["overhead"]
            lines.append(f"{'PASS' if ok else 'FAIL'}: overhead {c['overhead']:+.1%} {at} "
                         f"(target ≤ {t['overhead']:.0%}, Ray {result.get('ray', 'cold')})")
            if c.get("steady_overhead") is not None:
                ok = c["steady_overhead"] <= t["steady_overhead"]
                lines.append(f"{'PASS' if ok else 'FAIL'}: steady overhead {c['steady_overhead']:+.1%} {at} "
                             f"(target ≤ {t['steady_overhead']:.0%})")
            ratio = c["peak_rss_mb"] / c["plain_peak_rss_mb"] if c["plain_peak_rss_mb"] > 0 else float("inf")
            lines.append(f"{'PASS' if ratio <= t['memory_ratio'] else 'FAIL'}: peak memory {ratio:.2f}× the "
                         f"plain loops' {at} (target ≤ {t['memory_ratio']}×)")
            if c["ndcg@10"] is not None and c["plain_ndcg@10"] is not None:
                gap = abs(c["ndcg@10"] - c["plain_ndcg@10"])
                lines.append(f"{'PASS' if gap <= 0.005 else 'FAIL'}: NDCG@10 {c['ndcg@10']:.4f} vs plain "
                             f"{c['plain_ndcg@10']:.4f} {at} (target: within 0.005)")
    big = [c for c in cases if c["stores"] >= t["from_stores"] and c.get("size", "small") == "small"]
    if len(big) >= 2:
        a, b = big[0], big[-1]
        growth = (b["sim_s"] / a["sim_s"]) / (b["stores"] / a["stores"])
        lines.append(f"{'PASS' if growth <= 1.0 + 0.1 else 'FAIL'}: wall time {a['stores']}→{b['stores']} stores "
                     f"grew {b['sim_s'] / a['sim_s']:.2f}× for {b['stores'] / a['stores']:.0f}× the stores "
                     f"(≤ linear, 10% tolerance)")
    for c in cases:
        if c["stores"] >= 500:
            ok = c["peak_rss_mb"] < t.get("memory_limit_mb", 24 * 1024)
            lines.append(f"{'PASS' if ok else 'FAIL'}: {c['stores']} stores ran, peak {c['peak_rss_mb'] / 1024:.2f} GiB "
                         f"(target: fits 24 GiB)")
    check = result.get("memory_check")
    if check:
        lines.append(f"{'PASS' if check['fits'] else 'FAIL'}: {check['stores']} stores ran (1 round), peak "
                     f"{check['peak_rss_mb'] / 1024:.2f} GiB (target: fits {check['memory_limit_mb'] / 1024:.0f} GiB)")
    return lines
