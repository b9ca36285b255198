"""`storefed serve` as a real process on a loopback port: every endpoint and error, the bearer
key, a receipt seen at once and kept over a restart, a model swapped under load."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from client import layer_store
from client.model_store import keep_model, read_info
from common.data.dataset import ItemIndex
from common.data.storefiles import read_catalog
from common.learning.model import ModelConfig, Recommender
from common.learning.weights import weights_digest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_state(chain: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain)), ModelConfig(dim=16, hidden=32))
    return {k: v.numpy() for k, v in model.state_dict().items()}


class Server:
    def __init__(self, store: Path) -> None:
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "serve", "--store-dir", str(store),
                                      "--port", str(self.port)], env=env, cwd=ROOT,
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

    def call(self, method: str, path: str, body=None, key: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read() or b"null")
        conn.close()
        return out

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
        status, aud = server.call("GET", f"/v1/items/{item}/audience?k=50")
        assert status == 200 and aud["item_id"] == item and len(aud["members"]) == 50
        assert set(aud["members"][0]) == {"member_id", "score"}
        assert not set(refusing) & {m["member_id"] for m in aud["members"]}
        status, _ = server.call("GET", f"/v1/items/{item}/audience?k=10000")
        assert status == 200
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
        journal = (store / "state" / "receipts.journal.csv").read_text().splitlines()
        assert len(journal) == 2 and journal[1].startswith(f"API-1,2025-12-31T18:00:00,{member},{new_item},40,")
        status, after = server.call("GET", f"/v1/members/{member}/recommendations?k=100")
        now = {i["item_id"]: i for i in after["items"]}
        assert now[new_item]["reason"] == "buy_again"
        assert new_item not in before or before[new_item]["reason"] == "new_for_you"
    finally:
        server.stop()

    # Restart with a bearer key: the receipt is still reflected; no key → 401.
    meta = json.loads((store / "store.json").read_text())
    (store / "serve.key").write_text("s3cret\n")
    (store / "store.json").write_text(json.dumps({**meta, "serve_api_key_file": "serve.key"}))
    server = Server(store)
    try:
        assert server.call("GET", "/v1/health")[0] == 401
        assert server.call("GET", "/v1/health", key="wrong")[0] == 401
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
        (store / "store.json").write_text(json.dumps(meta))
