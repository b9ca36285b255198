"""`storefed bench serve`: the store's API under load, over real HTTP, server and load apart.

The server is `storefed serve` in its own process on a generated one-store chain. The model
is an untrained :class:`~common.learning.model.Recommender` over the catalog (seed 0): serving
cost does not depend on what the weights learned, only on their shapes. The load comes from
another process: ``concurrency`` keep-alive connections on raw asyncio sockets with
prebuilt request bytes (no HTTP client library), so the generator spends little of the CPU
it shares with the server. Reported per endpoint and concurrency: p50/p95/p99 latency,
requests per second, errors, and the CPU both processes used (% of one core). The store
gets a bearer key as a deployed one has (`storefed serve` starts only with one); every
request carries it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {  # issue 15, on 2 cores
    ("recommendations", 1): {"p99_ms": 10.0},
    ("recommendations", 16): {"p99_ms": 50.0, "rps": 800.0},
    ("audience", 1): {"p99_ms": 30.0},
}
ROOT = Path(__file__).resolve().parents[2]
KEY_FILE = "serve.key"  # in the generated store's directory, named in its store.json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(out: Path, members: int, items: int) -> tuple[Path, list[str], list[str], str]:
    """A one-store chain with an (untrained) model in the store's state and a bearer key;
    (store, member ids, item ids, key)."""
    import torch

    from client.serving.layers import keep_layer
    from client.state.model_store import keep_model
    from common.learning import local_layer as ll
    from common.data.dataset import ItemIndex
    from common.data.storefiles import read_catalog, write_chain
    from common.data.synth import ChainSpec, generate_chain
    from common.learning.model import ModelConfig, Recommender

    spec = ChainSpec(stores=1, members=members, items=items, categories=min(40, max(2, items // 50)),
                     brands=max(20, items // 10), seed=0, min_store_members=10)
    write_chain(generate_chain(spec), out / "chain")
    store = out / "chain" / "stores" / "S001"
    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(out / "chain")), ModelConfig())
    info = keep_model(store / "state", {k: v.numpy() for k, v in model.state_dict().items()}, run_id="bench",
                      server_round=0, epsilon=0.0, final=True)
    # Its store-local layer, kept with it as a delivery does. Like the model, its values do not
    # change what serving costs (a row of scores per member either way), so it is the unfitted
    # layer (the blend's starting weights) with every blend term switched on, not a fit of
    # minutes on a model that learned nothing. The fit's own cost: client/README.md "Serve recommendations".
    n = model.n_items
    layer = ll.fit(np.zeros((1, n)), ll.Histories([np.zeros(0, np.int64)], [np.zeros(0)], [np.zeros(0)], 0.0),
                   [np.zeros(0, np.int64)], np.ones(n), np.ones(n, dtype=bool), None)
    layer.weights = layer.weights + 0.1
    keep_layer(store / "state", layer, info["hash"], "delivery")
    import pandas as pd

    frame = pd.read_csv(store / "members.csv", dtype=str, keep_default_na=False)
    consenting = frame.loc[frame["consent_training"].str.lower().isin(["true", "1", "yes"]), "member_id"].tolist()
    sold = pd.read_csv(store / "transactions.csv", dtype=str, usecols=["item_id"])["item_id"].value_counts()
    key = secrets.token_hex(32)
    (store / KEY_FILE).write_text(key + "\n")
    os.chmod(store / KEY_FILE, 0o600)
    meta = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps({**meta, "serve_api_key_file": KEY_FILE}, indent=2))
    return store, consenting, sold.index[:1000].tolist(), key


def _health(port: int, key: str) -> dict:
    """GET /v1/health, on its own connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


async def _connection(port: int, paths: list[bytes], until: float, out: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rng = random.Random(len(out) + os.getpid())
    while time.perf_counter() < until:
        request = paths[rng.randrange(len(paths))]
        t0 = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        out.append(time.perf_counter() - t0)
        if not head.startswith(b"HTTP/1.1 200"):
            errors.append(1)
    writer.close()


def _load(port: int, paths: list[str], concurrency: int, duration_s: float, queue, key: str) -> None:
    """One load-generator process: ``concurrency`` connections for ``duration_s``."""
    requests = [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
                for p in paths]
    latencies: list[float] = []
    errors: list[int] = []

    async def main() -> None:
        until = time.perf_counter() + duration_s
        await asyncio.gather(*(_connection(port, requests, until, latencies, errors) for _ in range(concurrency)))

    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(main())
    queue.put({"latencies": latencies, "errors": len(errors), "cpu_s": time.process_time() - cpu0,
               "wall_s": time.perf_counter() - t0})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_case(port: int, server_pid: int, paths: list[str], concurrency: int, duration_s: float, key: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # Warm-up (connections, caches), not measured.
    warm = ctx.Process(target=_load, args=(port, paths, concurrency, 0.5, queue, key))
    warm.start()
    queue.get()
    warm.join()
    cpu0, t0 = _cpu_seconds(server_pid), time.perf_counter()
    proc = ctx.Process(target=_load, args=(port, paths, concurrency, duration_s, queue, key))
    proc.start()
    res = queue.get()
    proc.join()
    server_cpu = _cpu_seconds(server_pid) - cpu0
    wall = time.perf_counter() - t0
    lat = np.array(res["latencies"]) * 1000.0
    return {"concurrency": concurrency, "requests": int(len(lat)), "errors": res["errors"],
            "rps": float(len(lat) / res["wall_s"]),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "server_cpu_pct": 100.0 * server_cpu / wall, "load_cpu_pct": 100.0 * res["cpu_s"] / res["wall_s"],
            # CPU the server spent per answer: what bounds requests/s on a machine of its own
            # (one worker process: at most 1000 / this per second).
            "server_cpu_ms_per_request": 1000.0 * server_cpu / max(len(lat), 1)}


def bench_serve(members: int = 10_000, items: int = 10_000, concurrency: list[int] | None = None,
                duration_s: float = 5.0) -> dict:
    """Measure `storefed serve`; see the module docstring."""
    concurrency = concurrency or [1, 16]
    with tempfile.TemporaryDirectory(prefix="storefed-bench-serve-") as tmp:
        t0 = time.perf_counter()
        store, member_ids, item_ids, key = _prepare(Path(tmp), members, items)
        prepare_s = time.perf_counter() - t0
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "simulations.cli", "serve", "--store-dir", str(store),
                                   "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 600
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        if server.poll() is None:  # its output ends only when it does
                            server.kill()
                        raise RuntimeError("storefed serve did not start: " + (server.stdout.read() or ""))
                    time.sleep(0.2)
            startup_s = time.perf_counter() - t0
            # The store has no layer for this model: serve answers at once with the global model
            # and fits the layer aside; the cases are measured once it answers with the layer.
            health = _health(port, key)
            deadline = time.time() + 3600
            while not health.get("local_layer") and "being fitted" in str(health.get("local_layer_note")):
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("storefed serve did not fit its layer: " + str(health))
                time.sleep(0.5)
                health = _health(port, key)
            layer_s = time.perf_counter() - t0
            rng = random.Random(0)
            rec_paths = [f"/v1/members/{m}/recommendations?k=10" for m in rng.sample(member_ids, min(2000, len(member_ids)))]
            aud_paths = [f"/v1/items/{i}/audience?k=100" for i in item_ids]
            cases = []
            for endpoint, paths in (("recommendations", rec_paths), ("audience", aud_paths)):
                for c in concurrency:
                    cases.append({"endpoint": endpoint, **_run_case(port, server.pid, paths, c, duration_s, key)})
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return {"members": members, "consenting_members": len(member_ids), "items": items, "duration_s": duration_s,
            "cores": os.cpu_count(), "prepare_s": prepare_s, "server_startup_s": startup_s,
            "server_with_layer_s": layer_s,
            "model": "untrained Recommender (dim 64, hidden 128, seed 0): serving cost depends on shapes only",
            # With the store-local layer kept with the model (see _prepare).
            "local_layer": bool(health.get("local_layer")), "local_layer_fit": health.get("local_layer_fit"),
            "cases": cases, "targets": [verdict(cases, *key) for key in TARGETS]}


def verdict(cases: list[dict], endpoint: str, concurrency: int) -> dict:
    """One target of issue 15 against the measured case (met or by how much it misses)."""
    target = TARGETS[(endpoint, concurrency)]
    case = next((c for c in cases if c["endpoint"] == endpoint and c["concurrency"] == concurrency), None)
    if case is None:
        return {"endpoint": endpoint, "concurrency": concurrency, "target": target, "met": None}
    met = case["p99_ms"] <= target["p99_ms"] and case["rps"] >= target.get("rps", 0.0) and case["errors"] == 0
    return {"endpoint": endpoint, "concurrency": concurrency, "target": target, "met": bool(met),
            "p99_ms": case["p99_ms"], "rps": case["rps"]}


def render(result: dict) -> str:
    """The human table."""
    lines = [f"storefed serve on a generated store: {result['members']} members "
             f"({result['consenting_members']} consenting), {result['items']} items, {result['cores']} cores; "
             f"{result['duration_s']:g} s per case; server ready in {result['server_startup_s']:.1f} s; "
             + (f"with the store-local layer (in use at {result['server_with_layer_s']:.0f} s)"
                if result.get("local_layer") else "global model alone"),
             f"{'endpoint':<16} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6} "
             f"{'server CPU':>10} {'CPU ms/req':>10} {'load CPU':>9}"]
    for c in result["cases"]:
        lines.append(f"{c['endpoint']:<16} {c['concurrency']:>4} {c['rps']:7.0f} {c['p50_ms']:7.2f} "
                     f"{c['p95_ms']:7.2f} {c['p99_ms']:7.2f} {c['errors']:>6} {c['server_cpu_pct']:9.0f}% "
                     f"{c.get('server_cpu_ms_per_request', float('nan')):10.2f} {c['load_cpu_pct']:8.0f}%")
    for t in result["targets"]:
        if t["met"] is None:
            continue
        want = f"p99 ≤ {t['target']['p99_ms']:g} ms" + (f", ≥ {t['target']['rps']:g} req/s" if "rps" in t["target"] else "")
        lines.append(f"target {t['endpoint']} c={t['concurrency']} ({want}): "
                     f"{'met' if t['met'] else 'MISSED'} (p99 {t['p99_ms']:.1f} ms, {t['rps']:.0f} req/s)")
    return "\n".join(lines)
