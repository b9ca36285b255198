"""`storefed serve` as a real process on a loopback port: every endpoint and error, the bearer
key (required to start, on every path), body limits, a receipt seen at once and kept over a
restart, a model swapped under load."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import sqlite3
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from client.serving import layers as layer_store
from client.state.model_store import keep_model, read_info
from common.data.dataset import ItemIndex
from common.data.storefiles import read_catalog
from common.learning.model import ModelConfig, Recommender
from common.learning.weights import weights_digest

ROOT = Path(__file__).resolve().parents[1]
KEY = "k3y-0f-the-store"
_DEFAULT = object()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_state(chain: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain)), ModelConfig(dim=16, hidden=32))
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _serve_cmd(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "serve", "--store-dir", str(store), *args]


class Server:
    def __init__(self, store: Path, *args: str, key: str | None = KEY) -> None:
        self.port = _free_port()
        self.key = key
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(_serve_cmd(store, "--port", str(self.port), *args), env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stdout.read())
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("serve did not start")

    def call(self, method: str, path: str, body=None, key=_DEFAULT, raw: bool = False) -> tuple[int, object]:
        key = self.key if key is _DEFAULT else key
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        out = resp.status, (data if raw else json.loads(data or b"null"))
        conn.close()
        return out

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_chain_dir):
    chain = tmp_path_factory.mktemp("serve") / "chain"
    shutil.copytree(small_chain_dir, chain)
    store = chain / "stores" / "S001"
    keep_model(store / "state", _model_state(chain, 1), run_id="run-7", server_round=5, epsilon=3.25, final=True)
    (store / "serve.key").write_text(KEY + "\n")
    meta = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps({**meta, "serve_api_key_file": "serve.key"}))
    return store


def test_endpoints_errors_receipts_restart_key_and_model_swap(store):
    members = (store / "members.csv").read_text().splitlines()
    header = members[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in members[1:]]
    consenting = [r["member_id"] for r in rows if r["consent_training"].lower() in ("true", "1", "yes")]
    refusing = [r["member_id"] for r in rows if r["consent_training"].lower() in ("false", "0", "no")]
    catalog = read_catalog(store.parent.parent)
    server = Server(store)
    try:
        status, health = server.call("GET", "/v1/health")
        info = read_info(store / "state")
        # No layer was delivered with this model: the global model answers while serve fits one.
        deadline = time.time() + 120
        while status == 200 and not health["local_layer"] and time.time() < deadline:
            assert health["local_layer_fit"] is None and "being fitted" in health["local_layer_note"]
            time.sleep(0.2)
            status, health = server.call("GET", "/v1/health")
        fit = health.pop("local_layer_fit")
        assert status == 200 and health == {"status": "ok", "model": {"run_id": "run-7", "round": 5,
                                                                      "hash": info["hash"], "epsilon": 3.25},
                                            "local_layer": True, "local_layer_note": None}
        # ... and keeps it for that model.
        assert fit["fitted_by"] == "serve" and fit["model_hash"] == info["hash"] and fit["fitted_on"] > 0
        assert layer_store.read_layer(store / "state", info["hash"])[1]["fitted_at"] == fit["fitted_at"]
        member = consenting[0]
        status, rec = server.call("GET", f"/v1/members/{member}/recommendations?k=7")
        assert status == 200 and rec["member_id"] == member and rec["model"] == health["model"] and rec["local_layer"]
        assert len(rec["items"]) == 7 and set(rec["items"][0]) == {"item_id", "score", "reason"}
        scores = [i["score"] for i in rec["items"]]
        assert scores == sorted(scores, reverse=True)
        assert {i["reason"] for i in rec["items"]} <= {"buy_again", "new_for_you"}
        if refusing:  # no consent: best sellers, never in an audience
            status, other = server.call("GET", f"/v1/members/{refusing[0]}/recommendations?k=5")
            assert status == 200 and {i["reason"] for i in other["items"]} == {"popular_here"}
        for k in (0, 101, "x"):
            status, err = server.call("GET", f"/v1/members/{member}/recommendations?k={k}")
            assert status == 422 and set(err) == {"error"}
        status, err = server.call("GET", "/v1/members/NOBODY/recommendations")
        assert status == 404 and "NOBODY" in err["error"]
        item = str(catalog["item_id"].iloc[0])
        status, aud = server.call("GET", f"/v1/items/{item}/audience?k=20")
        limit = max(1, min(1000, len(consenting) // 4))
        assert status == 200 and aud == {"item_id": item, "members": aud["members"], "limit": limit}
        assert len(aud["members"]) == 20 and set(aud["members"][0]) == {"member_id", "score"}
        assert not set(refusing) & {m["member_id"] for m in aud["members"]}
        # The store's size is not a page size: at most a quarter of its consenting members, k ≤ 1000.
        status, aud = server.call("GET", f"/v1/items/{item}/audience?k=1000")
        assert status == 200 and len(aud["members"]) == limit < len(consenting)
        for k in (0, 1001, 10_000):
            status, err = server.call("GET", f"/v1/items/{item}/audience?k={k}")
            assert status == 422 and err == {"error": f"k must be between 1 and 1000, got {k}"}
        status, err = server.call("GET", "/v1/items/NO-SUCH-SKU/audience")
        assert status == 404 and "error" in err

        # A receipt with an item of the store the member never bought: buy_again at once. (A
        # member with a short history: the model reads the 50 most weighted items of a history.)
        sales = [line.split(",") for line in (store / "transactions.csv").read_text().splitlines()[1:]]
        lines_of = {m: sum(1 for s in sales if s[2] == m) for m in consenting}
        member = min((m for m in consenting if lines_of[m] > 0), key=lambda m: (lines_of[m], m))
        mine = {s[3] for s in sales if s[2] == member}
        new_item = next(s[3] for s in sales if s[3] not in mine)
        before = {i["item_id"]: i for i in server.call("GET", f"/v1/members/{member}/recommendations?k=100")[1]["items"]}
        receipt = {"receipt_id": "API-1", "ts": "2025-12-31T18:00:00", "member_id": member,
                   "lines": [{"item_id": new_item, "quantity": 40, "unit_price": 1.5}]}
        bad = dict(receipt, receipt_id="API-BAD", lines=[{"item_id": "NO-SUCH-SKU", "quantity": 0, "unit_price": -1}])
        status, err = server.call("POST", "/v1/receipts", bad)
        assert status == 422 and [r["reason"] for r in err["reasons"]] == ["unknown_item"]
        status, err = server.call("POST", "/v1/receipts", dict(receipt, receipt_id="API-F", ts="2099-01-01T00:00:00"))
        assert status == 422 and err["reasons"][0]["reason"] == "future_timestamp"
        status, err = server.call("POST", "/v1/receipts", dict(receipt, receipt_id="API-F", ts="2999-01-01T00:00:00"))
        assert status == 422 and err["reasons"][0]["reason"] == "bad_timestamp"
        status, err = server.call("POST", "/v1/receipts", {"receipt_id": "x"})
        assert status == 422 and err["reasons"]
        status, err = server.call("POST", "/v1/receipts", dict(receipt, receipt_id="API-U", member_id="NOBODY"))
        assert status == 422 and err["reasons"][0]["reason"] == "unknown_member"
        status, ok = server.call("POST", "/v1/receipts", receipt)
        assert status == 201 and ok["receipt_id"] == "API-1"
        assert server.call("POST", "/v1/receipts", receipt)[0] == 200  # a retry is recorded once
        status, again = server.call("POST", "/v1/receipts", dict(receipt, ts="2025-12-31T19:00:00"))
        assert status == 409 and [r["reason"] for r in again["reasons"]] == ["duplicate_receipt_id"]
        with sqlite3.connect(store / "state" / "receipts.journal.sqlite") as con:
            assert con.execute("SELECT * FROM lines").fetchall() == [
                (1, "API-1", "2025-12-31T18:00:00", member, new_item, "40", "1.5", "", "api")]
            assert con.execute("SELECT receipt_id, n_lines FROM receipts").fetchall() == [("API-1", 1)]
        status, after = server.call("GET", f"/v1/members/{member}/recommendations?k=100")
        now = {i["item_id"]: i for i in after["items"]}
        assert now[new_item]["reason"] == "buy_again"
        assert new_item not in before or before[new_item]["reason"] == "new_for_you"
    finally:
        server.stop()

    # Restart with another key, from --api-key-file (over store.json's): the receipt is still
    # reflected; the store.json key no longer opens it.
    (store / "other.key").write_text("s3cret\n")
    server = Server(store, "--api-key-file", str(store / "other.key"), key="s3cret")
    try:
        assert server.call("GET", "/v1/health", key=None)[0] == 401
        assert server.call("GET", "/v1/health", key=KEY)[0] == 401
        status, again = server.call("GET", f"/v1/members/{member}/recommendations?k=10", key="s3cret")
        assert status == 200 and again["items"][:10] == after["items"][:10]

        # A new model delivered under load: every request answers 200, and the new hash arrives.
        failures, answered, stop = [], [0], threading.Event()

        def load() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            while not stop.is_set():
                conn.request("GET", f"/v1/members/{member}/recommendations?k=10",
                             headers={"Authorization": "Bearer s3cret"})
                resp = conn.getresponse()
                resp.read()
                answered[0] += 1
                if resp.status != 200:
                    failures.append(resp.status)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        # As a delivery does it: the new model's layer first (here the old one's, re-tied), then the model.
        state2 = _model_state(store.parent.parent, 2)
        new_hash = weights_digest(state2)
        old_layer, _ = layer_store.read_layer(store / "state", info["hash"])
        layer_store.keep_layer(store / "state", dataclasses.replace(old_layer, fitted_on=7), new_hash, "delivery")
        new = keep_model(store / "state", state2, run_id="run-8", server_round=6, epsilon=4.0, final=True)
        deadline = time.time() + 20
        while time.time() < deadline and server.call("GET", "/v1/health", key="s3cret")[1]["model"]["hash"] != new["hash"]:
            time.sleep(0.2)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        health = server.call("GET", "/v1/health", key="s3cret")[1]
        # Model and layer swapped together: the layer in use is the one fitted on the new model.
        assert health["model"]["run_id"] == "run-8" and health["local_layer"]
        assert health["local_layer_fit"] == {**health["local_layer_fit"], "model_hash": new["hash"], "fitted_on": 7,
                                             "fitted_by": "delivery"}
        assert failures == [] and answered[0] > 20
    finally:
        server.stop()


def test_serve_does_not_start_without_a_key_and_opens_only_on_loopback(store, tmp_path):
    """Exit 2 and one line naming the setting, before the store is loaded."""
    meta = json.loads((store / "store.json").read_text())
    bare = tmp_path / "chain" / "stores" / "S001"
    shutil.copytree(store, bare)
    shutil.copy(store.parent.parent / "catalog.csv", tmp_path / "chain" / "catalog.csv")
    (bare / "store.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "serve_api_key_file"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def refused(where: Path, *args: str) -> str:
        done = subprocess.run(_serve_cmd(where, "--port", str(_free_port()), *args), env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("storefed: ")
        return lines[0]

    line = refused(bare)
    assert "no bearer key" in line and "serve_api_key_file" in line and "--api-key-file" in line
    for content in ("", "\n"):  # a key file of nothing but whitespace is no key
        (bare / "serve.key").write_text(content)
        (bare / "store.json").write_text(json.dumps({**meta, "serve_api_key_file": "serve.key"}))
        assert "no bearer key" in refused(bare)
    (tmp_path / "blank.key").write_text("  \t\n")
    assert "no bearer key" in refused(bare, "--api-key-file", str(tmp_path / "blank.key"))
    (bare / "store.json").write_text(json.dumps({**meta, "serve_api_key_file": "missing.key"}))
    line = refused(bare)
    assert "missing.key" in line and "cannot be read" in line
    (tmp_path / "spaced.key").write_text("two words\n")
    assert "whitespace" in refused(bare, "--api-key-file", str(tmp_path / "spaced.key"))
    (bare / "store.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "serve_api_key_file"}))
    for host in ("0.0.0.0", "store.example"):
        assert "loopback" in refused(bare, "--no-auth", "--host", host)
    assert "--no-auth and a bearer key" in refused(store, "--no-auth")

    # --no-auth on loopback: open, and it says so.
    server = Server(bare, "--no-auth", "--host", "127.0.0.1", key=None)
    try:
        assert server.call("GET", "/v1/health")[0] == 200
        assert server.call("GET", "/openapi.json")[0] == 200
    finally:
        server.stop()
    assert "OPEN, no key" in server.proc.stdout.read()


def _raw_post(port: int, body: bytes, key: str | None, chunked: bool = False) -> tuple[int, bytes, int]:
    """POST ``body`` on a raw socket; (status, answer body, bytes of the body sent before the answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "POST /v1/receipts HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {key}\r\n" if key else ""
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n"
    sent = 0
    try:
        sock.sendall(head.encode())
        for a in range(0, len(body), 1 << 16):
            part = body[a:a + (1 << 16)]
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
            sent += len(part)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered and closed without reading the rest
        pass
    reply = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 2 or not reply.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    sock.close()
    return int(reply.split(b" ", 2)[1]), reply.split(b"\r\n\r\n", 1)[1], sent


def test_every_path_needs_the_key_and_bodies_are_bounded(store):
    server = Server(store)
    try:
        member = next(line.split(",")[0] for line in (store / "members.csv").read_text().splitlines()[1:])
        item = next(line.split(",")[0] for line in (store.parent.parent / "catalog.csv").read_text().splitlines()[1:])
        paths = ["/v1/health", f"/v1/members/{member}/recommendations", f"/v1/items/{item}/audience",
                 "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]
        for path in paths:
            for key in (None, "", "wrong", KEY + "x", KEY[:-1], f"{KEY} "):
                status, body = server.call("GET", path, key=key, raw=True)
                assert status == 401 and json.loads(body) == {
                    "error": "missing or wrong bearer key (Authorization: Bearer <key>)"}, (path, key)
            status, body = server.call("GET", path, raw=True)
            assert status == 200, (path, status, body[:200])
        assert b"/v1/receipts" in server.call("GET", "/openapi.json", raw=True)[1]
        # Paths that do not exist answer 401 without the key (nothing to probe), 404 with it.
        assert server.call("GET", "/nothing-here", key=None, raw=True)[0] == 401
        assert server.call("GET", "/nothing-here", raw=True)[0] == 404
        receipt = {"receipt_id": "KEY-1", "ts": "2025-12-31T18:00:00", "member_id": "",
                   "lines": [{"item_id": item, "quantity": 1, "unit_price": 1.0}]}
        assert server.call("POST", "/v1/receipts", receipt, key=None)[0] == 401
        assert server.call("POST", "/v1/receipts", receipt, key="wrong")[0] == 401
        assert server.call("POST", "/v1/receipts", receipt) == (201, {"receipt_id": "KEY-1", "lines": 1,
                                                                      "recorded": "now"})

        # 40 MiB: 413 by its Content-Length, before its body is read (the memory shows it).
        big = b'{"receipt_id": "' + b"A" * (40 << 20) + b'"}'
        rss = server.rss_mib()
        status, body, _ = _raw_post(server.port, big, KEY)
        assert status == 413 and json.loads(body) == {"error": "the request body is larger than 1048576 bytes"}
        assert server.rss_mib() - rss < 10
        assert _raw_post(server.port, big, None)[0] == 401  # no key: not even the limit is discussed
        # Chunked (no Content-Length): counted as it arrives, 413 past 1 MiB.
        status, body, _ = _raw_post(server.port, b" " * ((1 << 20) + 1), KEY, chunked=True)
        assert status == 413 and b"larger than 1048576 bytes" in body
        assert server.rss_mib() - rss < 20
        # Just under the limit: read and judged.
        status, body, _ = _raw_post(server.port, b" " * ((1 << 20) - 2) + b"{}", KEY)
        assert status == 422 and json.loads(body)["reasons"]
        status, body, _ = _raw_post(server.port, b" " * ((1 << 20) - 2) + b"{}", KEY, chunked=True)
        assert status == 422
        assert server.call("GET", "/v1/health")[0] == 200  # still answering
    finally:
        server.stop()


def test_which_hosts_are_loopback_and_which_keys_are_keys(tmp_path):
    from client.serving.api import check_access, is_loopback
    from common.config import ConfigError

    assert all(map(is_loopback, ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.0.2.7", "10.0.0.1", "store.example", "")))
    meta = {"store_id": "S9"}
    for given in ({"serve_api_key": ""}, {"serve_api_key": " \n"}, {}):
        with pytest.raises(ConfigError, match="no bearer key for store S9"):
            check_access({**meta, **given}, tmp_path, "127.0.0.1", None, False)
    assert check_access({**meta, "serve_api_key": " k1 "}, tmp_path, "0.0.0.0", None, False) == "k1"
    (tmp_path / "f.key").write_text("k2\n")
    # The flag wins over store.json; --no-auth is open (None) on loopback only.
    assert check_access({**meta, "serve_api_key": "k1"}, tmp_path, "0.0.0.0", tmp_path / "f.key", False) == "k2"
    assert check_access(meta, tmp_path, "::1", None, True) is None
    with pytest.raises(ConfigError, match="loopback"):
        check_access(meta, tmp_path, "0.0.0.0", None, True)
