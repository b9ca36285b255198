"""The operator's dashboard and a store's privacy page in a real headless Chromium, over one
small simulated run (three stores: one trains every round, one declines its second round
(its own budget), one refuses (a file it cannot read)).

Each page's numbers, read from the DOM as a person reads them, equal those of
``results.json`` and of ``privacy_report`` (what `storefed privacy --json` prints); no page
logs a console error or asks for anything beyond loopback; a screenshot of each page is
written under the test's temporary directory. The store's page shows its sign-in, not its
data, without the key, refuses a wrong key, and its cookie opens no JSON endpoint.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import Browser, require_chromium
from client.state.model_store import read_info
from client.state.privacy_report import privacy_report
from common.data.ingest import validate_store
from common.data.storefiles import write_chain
from common.data.synth import ChainSpec, generate_chain
from common.view.html import num

ROOT = Path(__file__).resolve().parents[1]
KEY = "the-key-0f-store-S002"
SHOTS: dict[str, Path] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server started with ``code`` (Python) on a free loopback port; stopped by pid."""

    def __init__(self, code: str, port: int, wait_s: float = 120) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stdout.read())
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer on port {port} in {wait_s} s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One simulation, shared by every test here: (chain, out, results)."""
    require_chromium()
    from simulations.simulate import simulate

    base = tmp_path_factory.mktemp("pages")
    chain = base / "chain"
    write_chain(generate_chain(ChainSpec(stores=3, members=600, items=300, categories=10, brands=30, seed=5)), chain)
    meta_path = chain / "stores" / "S002" / "store.json"
    meta = json.loads(meta_path.read_text())
    # Round 1 costs about ε 6.4, two rounds about 8: this store trains once, then declines.
    meta_path.write_text(json.dumps({**meta, "epsilon_budget": 7.0, "serve_api_key_file": "serve.key"}))
    (chain / "stores" / "S002" / "serve.key").write_text(KEY + "\n")
    (chain / "stores" / "S003" / "transactions.csv").rename(chain / "stores" / "S003" / "transactions.csv.away")
    results = simulate({"stores": 3, "rounds": 2, "seed": 5, "data-dir": str(chain), "out-dir": str(base / "out"),
                        "node-wait-s": 30.0})
    return chain, base / "out", results


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    where = tmp_path_factory.mktemp("screenshots")
    yield where
    print("\nscreenshots: " + ", ".join(f"{k} {v}" for k, v in SHOTS.items()))


def _clean(b: Browser, since: int, origin: str) -> None:
    """No console error, and nothing asked for beyond the page's own loopback server."""
    assert b.errors(since) == []
    outside = [u for u in b.requested(since) if not (u.startswith(origin + "/") or u.startswith("data:"))]
    assert outside == []


def _shot(b: Browser, shots: Path, name: str) -> None:
    SHOTS[name] = b.screenshot(shots / f"{name}.png")
    assert SHOTS[name].stat().st_size > 10_000


def test_the_dashboard_shows_the_runs_numbers(run, browser, shots):
    chain, out, results = run
    bench = ROOT / "simulations" / "results" / "quality-seed0"
    port = _free_port()
    dash = Process(f"from server.dashboard.app import serve_dashboard; "
                   f"serve_dashboard([{str(out)!r}, {str(bench)!r}], '127.0.0.1', {port})", port)
    try:
        since = len(browser.events)
        browser.open(dash.url + "/")
        rows = {r[0]: r for r in browser.table("runs")[1:]}
        eps = [p["epsilon"] for p in results["privacy"].values()]
        assert rows["out"][1:] == ["run", results["finished_at"], "unsigned", "fedavg", "3", "2", rows["out"][7],
                                   f"{num(min(eps), 2)} – {num(max(eps), 2)}"]
        assert rows["out"][7].startswith("complete") and rows["quality-seed0"][1] == "benchmark"
        _clean(browser, since, dash.url)
        _shot(browser, shots, "dashboard-runs")

        since = len(browser.events)
        browser.open(browser.eval("Array.from(document.querySelectorAll('a')).find(a => a.innerText == 'out').href"))
        quality = browser.table("quality")
        assert quality[0] == ["model", "ndcg@10", "recall@10", "hit@10", "map@10", "ndcg@20", "recall@20"]
        assert quality[1][1:] == [num(v) for v in results["model"].values()]
        assert quality[2][1:] == [num(v) for v in results["global_model"].values()]
        assert quality[3][1:] == [num(v) for v in results["baselines"]["store_pop"].values()]
        rounds = browser.table("rounds")[1:]
        for shown, r in zip(rounds, results["per_round"]):
            assert shown[:6] == [str(r["round"]), str(r["participated"]), str(r["declined"]), str(r["failed"]),
                                 str(r["rejected"]), num(r["quality"]["served"])]
            assert shown[6] == num(r["quality"]["global_model"]) and shown[9] == num(r["max_epsilon"])
        privacy = {r[0]: r for r in browser.table("privacy")[1:]}
        for store, p in results["privacy"].items():
            assert privacy[store][1:4] == [num(p["epsilon"]), num(p["budget"]), num(p["budget"] - p["epsilon"])]
            assert privacy[store][6:8] == [str(p["rounds_trained"]), str(p["declined_rounds"])]
        # A simulated store that cannot read its data is named by its partition (it cannot read store.json).
        refused = results["per_round"][0]["stores"]["refused"][0]
        assert privacy["S001"][9] == "yes" and privacy["S002"][9] == "yes" and privacy[refused][9] == "no"
        outcomes = {r[0]: r[1:] for r in browser.table("outcomes")[1:]}
        assert outcomes == {"S001": ["trained", "trained"], "S002": ["trained", "declined"],
                            refused: ["refused", "refused"]}
        reasons = browser.table("reasons")[1:]
        assert ["2", "S002", "declined", results["per_round"][1]["declines"]["S002"]] in reasons
        assert any(r[1] == refused and r[2] == "refused" and "S003/transactions.csv: file not found" in r[3]
                   for r in reasons)
        failed = browser.table("delivery-failed")[1:]
        assert failed == [[refused, results["delivery"]["failed"][0]["reason"]]]
        delivery = browser.table("delivery")[1]
        assert delivery[0] == results["delivery"]["hash"] and delivery[2] == f"{len(results['delivery']['delivered'])} stores"
        assert browser.text("[data-testid=kept-by]") == "Kept by: " + ", ".join(results["delivery"]["delivered"])
        assert browser.eval("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        _clean(browser, since, dash.url)
        _shot(browser, shots, "dashboard-run")

        since = len(browser.events)
        browser.open(dash.url + "/")
        browser.open(browser.eval("Array.from(document.querySelectorAll('a'))"
                                  ".find(a => a.innerText == 'quality-seed0').href"))
        bench_results = json.loads((bench / "results.json").read_text())
        explore = {r[0]: r for r in browser.table("explore")[1:]}
        for eps in bench_results["settings"]["epsilons"]:
            m = bench_results["methods"][f"fed_dp_eps{eps:g}"]["member_weighted"]
            assert explore[f"{eps:g}"][1] == num(m["explore"]["ndcg@10"]) and explore[f"{eps:g}"][4] == num(m["all"]["ndcg@10"])
        headings = browser.eval("Array.from(document.querySelectorAll('h2')).map(h => h.innerText)")
        assert headings[0].startswith("Explore NDCG@10 against ε")  # explore vs ε first
        campaign = {r[0]: r for r in browser.table("campaign")[1:]}
        assert campaign["fed_dp_eps8"][1] == num(bench_results["methods"]["fed_dp_eps8"]["audience"]["auc"])
        assert browser.eval("Array.from(document.images).length") >= 4  # the explore chart and the report's plots
        assert browser.eval("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        _clean(browser, since, dash.url)
        _shot(browser, shots, "dashboard-benchmark")
    finally:
        dash.stop()


@pytest.fixture(scope="module")
def store(run):
    """`storefed serve` at S002 (trained once, then declined), behind its key."""
    chain, _, _ = run
    store_dir = chain / "stores" / "S002"
    port = _free_port()
    server = Process(f"from pathlib import Path; from client.serving.api import serve; "
                     f"serve(Path({str(store_dir)!r}), None, '127.0.0.1', {port})", port, wait_s=180)
    yield store_dir, server
    server.stop()


def _get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def test_the_store_page_needs_the_key_and_shows_the_ledger(run, store, browser, shots):
    chain, _, results = run
    store_dir, server = store
    for _ in range(5):  # a few API requests for the latency table
        assert _get(server.port, "/v1/health", {"Authorization": f"Bearer {KEY}"})[0] == 200

    since = len(browser.events)
    browser.open(server.url + "/privacy")
    text = browser.text()
    assert "Sign in to store S002" in text and "ε spent" not in text and "Privacy budget" not in text
    _shot(browser, shots, "store-signin")
    browser.submit("#key", "not-" + KEY)
    assert "That is not this store's key" in browser.text("[data-testid=signin-error]")
    assert "Privacy budget" not in browser.text()
    # Both refusals are 401 answers (Chromium logs each): nothing else went wrong.
    assert [e for e in browser.errors(since) if "status of 401" not in e] == []
    since = len(browser.events)
    browser.submit("#key", KEY)
    assert browser.eval("location.pathname") == "/privacy" and "Privacy at store S002" in browser.text()
    assert browser.eval("document.cookie") == ""  # HttpOnly: the page's script cannot read the session

    report = privacy_report(store_dir)  # what `storefed privacy --json --store-dir` prints
    budget = {c.split("\n")[0]: c.split("\n")[1] for c in browser.eval(
        "Array.from(document.querySelectorAll('[data-testid=budget] .card')).map(c => c.innerText)")}
    assert budget["ε spent"] == num(report["epsilon"]) and budget["ε budget"] == num(report["budget"]) == "7.0000"
    assert budget["ε left"] == num(report["budget"] - report["epsilon"]) and budget["δ"] == f"{report['delta']:.0e}"
    assert budget["rounds left at the last settings"] == str(report["remaining_rounds"])
    events = browser.table("events")[1:]
    # The run's explore release (round 0, DESIGN §5.3), then the one round S002 trained.
    assert len(events) == len(report["events"]) == 2 and [e["round"] for e in report["events"]] == [0, 1]
    for shown, e in zip(events, report["events"]):
        assert shown[1:9] == [e["run_id"], str(e["round"]), e["at"], num(e["noise_multiplier"]), num(e["sample_rate"]),
                              str(e["steps"]), num(e["clip_norm"], 2), f"{e['delta']:.0e}"]
    assert events[-1][9] == num(report["epsilon"])  # ε after the last event is the store's spend
    assert browser.text("[data-testid=reservations-none]") == "None."
    info = read_info(store_dir / "state")
    model = browser.table("model")[1]
    assert model[0] == info["run_id"] and model[2] == str(info["round"]) and model[3] == info["hash"]
    assert model[4] == num(info["epsilon"]) and model[3] == results["delivery"]["hash"]
    refusals = browser.table("refusals")[1:]
    assert [r[2:5] for r in refusals] == [["2", "train", "declined"]]
    assert refusals[0][5] == results["per_round"][1]["declines"]["S002"]
    sent = browser.table("sent")[1:]
    kinds = [r[3] for r in sent]
    assert kinds.count("train") == 1 and kinds.count("evaluate") == 2 and kinds.count("query.model") == 1
    assert kinds.count("query.explore") == 1
    # The release is listed by its size (one vector of n_items + n_categories² float64s) and its σ.
    from common.data.dataset import ItemIndex
    from common.data.storefiles import read_catalog

    items = ItemIndex.from_catalog(read_catalog(chain))
    release = next(r for r in sent if r[3] == "query.explore")
    tensors, size = release[4].removesuffix(" bytes").split(" tensors, ")
    assert tensors == "1" and int(size) >= 8 * (items.n_items + items.n_categories ** 2)
    assert f"noise-multiplier={report['events'][0]['noise_multiplier']:.6g}" in release[5]
    train = next(r for r in sent if r[3] == "train")
    assert train[4].endswith("bytes") and f"epsilon={report['epsilon']:.6g}" in train[5]
    from common.exchange import wire

    allowed = set(wire.TRAIN_METRICS) | set(wire.TRAIN_CONFIG) | set(wire.EVAL_METRICS) | set(wire.EVAL_CONFIG) \
        | set(wire.MODEL_ACK_CONFIG) | set(wire.EXPLORE_METRICS) | set(wire.EXPLORE_CONFIG)
    for row in sent:
        assert {pair.split("=")[0] for pair in row[5].split(", ")} <= allowed
    checked = validate_store(store_dir, chain, keep_data=False)
    validation = {r[0]: r for r in browser.table("validation")[1:]}
    for name, rep in checked.files.items():
        assert validation[name][1:3] == [str(rep.rows_in), str(rep.accepted)]
        assert validation[name][3] == str(sum(rep.excluded.values()))
        assert validation[name][5] == str(sum(rep.quarantined.values()))
    latency = browser.table("latency")[1]
    assert int(latency[0]) >= 5 and all(float(v) > 0 for v in latency[2:5])
    assert browser.eval("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    _clean(browser, since, server.url)
    _shot(browser, shots, "store-privacy")
    # The cookie opens the pages, not the JSON API: that keeps the bearer key.
    browser.open(server.url + "/v1/health")
    assert json.loads(browser.text()) == {"error": "missing or wrong bearer key (Authorization: Bearer <key>)"}

    status, headers, _ = _get(server.port, "/privacy")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/signin", body=f"key={KEY}", headers={"Content-Type": "application/x-www-form-urlencoded"})
    answer = conn.getresponse()
    cookie = answer.getheader("set-cookie")
    conn.close()
    assert answer.status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie and KEY not in cookie


def test_the_api_docs_render_offline(store, browser, shots):
    _, server = store
    since = len(browser.events)
    browser.open(server.url + "/docs")  # signed in by the test before: the session cookie opens the docs
    browser.wait_for("document.querySelectorAll('.opblock').length >= 4")
    operations = browser.eval("Array.from(document.querySelectorAll('.opblock-summary-path')).map(e => e.innerText)")
    assert "/v1/receipts" in operations and "/v1/health" in operations
    _clean(browser, since, server.url)
    assert any(u.endswith("/static-offline-docs/swagger-ui-bundle.js") for u in browser.requested(since))
    _shot(browser, shots, "store-docs")
