"""How fast the operator's dashboard answers over many large runs (issue 26: 100 runs × 500
stores, each page under a second), on synthetic run directories.

The run directories are written by :func:`server.report.build_results` — the code path of a
real run — from generated rounds: every store trains, declines (its budget) or refuses (a
file it cannot read) by chance, with its reason, and the final model is kept by the stores
that were still training. One more directory holds a damaged ``results.json``, which the
list must show as damaged. The dashboard then runs as `storefed dashboard` does (uvicorn on
a loopback port, in this process) and every page is asked over HTTP.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import statistics
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common.data.storefiles import atomic_write_text
from common.evaluation.metrics import METRIC_KEYS
from common.exchange.wire import BASELINES
from server.report import build_results

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedprox", "fedtrimmedavg")


def synthetic_run(run: int, stores: int, rounds: int, seed: int = 0) -> dict:
    """One run's results object, as run_chain writes it, from generated rounds."""
    rng = random.Random(seed * 100_003 + run)
    ids = [f"S{i + 1:04d}" for i in range(stores)]
    budget = 8.0
    sigma = {s: rng.uniform(0.7, 1.2) for s in ids}
    refusing = set(rng.sample(ids, max(1, stores // 50)))
    spent = {s: 0.0 for s in ids}
    per_round, failures, privacy = [], [], {}
    for rnd in range(1, rounds + 1):
        did: dict[str, list[str]] = {"trained": [], "declined": [], "refused": []}
        declines = {}
        for s in ids:
            if s in refusing:
                did["refused"].append(s)
                failures.append({"round": rnd, "node": int(s[1:]), "store": s, "phase": "train",
                                 "reason": f"refused: /srv/store/{s}/transactions.csv: required column 'ts' is missing"})
                continue
            step = 8.0 / rounds * rng.uniform(0.8, 1.25)
            if spent[s] + step > budget:
                did["declined"].append(s)
                declines[s] = (f"training this round would bring ε from {spent[s]:.3f} to {spent[s] + step:.3f}, "
                               f"over the store's budget {budget:g}")
                previous = privacy.get(s, {"rounds_trained": 0, "noise_multiplier": sigma[s], "declined_rounds": 0})
                privacy[s] = {**previous, "epsilon": spent[s], "delta": 1e-6, "budget": budget, "accountant": "prv",
                              "declined_rounds": previous.get("declined_rounds", 0) + 1}
                continue
            spent[s] += step
            did["trained"].append(s)
            previous = privacy.get(s, {"declined_rounds": 0})
            privacy[s] = {**previous, "epsilon": spent[s], "delta": 1e-6, "noise_multiplier": sigma[s],
                          "rounds_trained": previous.get("rounds_trained", 0) + 1, "budget": budget,
                          "accountant": "prv", "members": 500}
        quality = 0.30 + 0.01 * rnd + rng.uniform(-0.005, 0.005)
        metrics = {k: quality for k in METRIC_KEYS}
        metrics.update({f"global_model.{k}": quality - 0.004 for k in METRIC_KEYS})
        for b, drop in zip(BASELINES, (0.2, 0.02)):
            metrics.update({f"{b}.{k}": quality - drop for k in METRIC_KEYS})
        entry = {"round": rnd, "participated": len(did["trained"]), "declined": len(did["declined"]),
                 "failed": len(did["refused"]), "rejected": 0, "bytes_received": 662_666 * len(did["trained"]),
                 "train_loss": 5.5 - 0.05 * rnd, "ndcg@10": quality, "metrics": metrics, "evaluated": stores,
                 "max_epsilon": max(spent.values()), "seconds": rng.uniform(20, 60),
                 "stores": {k: sorted(v) for k, v in did.items() if v}, "declines": declines}
        per_round.append(entry)
    final = per_round[-1]["metrics"]
    started = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=run)
    results = build_results(cfg={"rounds": rounds, "seed": seed, "dp": True, "target-epsilon": 8.0}, stores=stores,
                            rounds=per_round, privacy=privacy, final_metrics=final, elapsed_s=rng.uniform(600, 3600),
                            failures=failures, out_dir=f"/srv/runs/run-{run}", data_dir="/srv/chain")
    digest = f"{rng.getrandbits(256):064x}"
    results.update(strategy=STRATEGIES[run % len(STRATEGIES)], run_id=f"run-{1000 + run}",
                   started_at=started.isoformat(timespec="seconds"),
                   finished_at=(started + timedelta(minutes=45)).isoformat(timespec="seconds"),
                   signed_by=f"{rng.getrandbits(64):016x}" if run % 3 else None,
                   delivery={"hash": digest, "round": rounds, "delivered": sorted(set(ids) - refusing),
                             "failed": [{"node": int(s[1:]), "store": s, "reason": "cannot read its data"}
                                        for s in sorted(refusing)]})
    return results


def write_synthetic_runs(out: Path, runs: int = 100, stores: int = 500, rounds: int = 10, seed: int = 0,
                         damaged: bool = True) -> list[Path]:
    """``runs`` run directories (``run-0000/results.json`` …) under ``out``, and with
    ``damaged`` one more whose results.json is cut off; returns the directories."""
    out = Path(out)
    dirs = []
    for run in range(runs):
        where = out / f"run-{run:04d}"
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_text(where / "results.json", json.dumps(synthetic_run(run, stores, rounds, seed), indent=1) + "\n")
        dirs.append(where)
    if damaged:
        where = out / "run-damaged"
        where.mkdir(parents=True, exist_ok=True)
        text = json.dumps(synthetic_run(runs, min(stores, 20), rounds, seed))
        atomic_write_text(where / "results.json", text[: len(text) // 2])
        dirs.append(where)
    return dirs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, int, float]:
    """(status, bytes, seconds) of one GET."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, len(body), time.perf_counter() - started


def bench_dashboard(runs: int = 100, stores: int = 500, rounds: int = 10, repeats: int = 5,
                    out: Path | None = None) -> dict:
    """Time every page of the dashboard over synthetic runs; returns milliseconds per page:
    ``{"pages": {page: {"first", "median", "max", "bytes", "status"}}, "runs", "stores", …}``."""
    import uvicorn

    from server.dashboard.app import create_dashboard
    from server.dashboard.runs import RunIndex

    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="storefed-dashboard-bench-"))
    started = time.perf_counter()
    dirs = write_synthetic_runs(out, runs, stores, rounds)
    written = time.perf_counter() - started
    index = RunIndex([out])
    t0 = time.perf_counter()
    index.list(fresh=True)  # as `storefed dashboard` does before it serves: every results.json parsed once
    cold_list = time.perf_counter() - t0
    from common.view import charts

    t0 = time.perf_counter()
    charts.warm()  # `storefed dashboard` warms matplotlib at start-up too (in a thread)
    warm_charts = time.perf_counter() - t0
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_dashboard(index), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, name="dashboard-bench", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        pages = {"runs list": "/"}
        rows = index.list()
        run = next(s for s in rows if s.kind == "run" and not s.damaged)
        damaged = next(s for s in rows if s.damaged)
        pages.update({"one run": f"/runs/{run.key}", "its quality chart": f"/runs/{run.key}/quality.svg",
                      "its ε chart": f"/runs/{run.key}/epsilon.svg", "a damaged run": f"/runs/{damaged.key}"})
        timings = {}
        for name, path in pages.items():
            samples = [_get(port, path) for _ in range(repeats)]
            secs = [s[2] for s in samples]
            timings[name] = {"path": path, "status": samples[0][0], "bytes": samples[0][1],
                             "first_ms": round(secs[0] * 1000, 1), "median_ms": round(statistics.median(secs) * 1000, 1),
                             "max_ms": round(max(secs) * 1000, 1)}
    finally:
        server.should_exit = True
        thread.join(10)
    return {"runs": runs, "stores": stores, "rounds": rounds, "dir": str(out), "run_dirs": len(dirs),
            "write_s": round(written, 1), "startup_index_ms": round(cold_list * 1000, 1),
            "startup_charts_ms": round(warm_charts * 1000, 1), "pages": timings,
            "under_1s": all(t["max_ms"] < 1000 for t in timings.values())}


if __name__ == "__main__":  # python -m simulations.bench.dashboard [runs] [stores]
    import sys

    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(bench_dashboard(*args), indent=1))
