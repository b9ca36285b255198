"""The deployed system with real processes on loopback: a SuperLink with TLS and SuperNode
authentication, one store daemon per store (a SuperNode in process isolation and storefed's
executor, started with the command lines of simulations/local_deploy.py), runs signed with
the operator key (simulations/train.py) against a federation in FLWR_HOME.

One scenario, run once for the module (the tests below each check one part of it):

1. a development CA and server certificate, a key pair per store;
2. SuperLink with TLS, ``--enable-supernode-auth`` and a state database; stores S001–S004
   registered with ``flwr supernode register``;
3. SuperNodes for S001–S004 (S004's transactions lack a column: it must refuse, not crash),
   and a fifth SuperNode whose key nobody registered (store S005): it must be turned away;
4. a signed ``flwr run`` of 3 rounds that stops after round 2 (as a server stop would); S003's daemon
   is killed (SIGKILL) right after round 1;
5. S003's daemon restarts and rejoins, and a signed ``flwr run`` with ``resume=true`` trains round 3.

Issue 14's attacks run against ``storefed local-deploy`` in tests/test_deploy_security.py.

Select with ``-m deploy``, skip with ``-m "not deploy"``. Measured at 140–156 s on 2 shared
cores (most of it Flower's heartbeat timeout for the killed daemon); the processes it starts
are stopped by pid at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.ledger import read_events
from client.node_key import make_node_key
from common.privacy import accountant as privacy
from common.data.storefiles import write_chain
from common.data.synth import ChainSpec, generate_chain
from server.certs import make_dev_pki
from server.operator_key import make_operator_key
from simulations.cli import main
from simulations.local_deploy import register_stores, store_exec_argv, store_node_config, superlink_argv, supernode_argv
from simulations.train import signed_run_config
from deploy_harness import BIN, Processes, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
REGISTERED = ("S001", "S002", "S003", "S004")
INTRUDER = "S005"

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not sys.platform.startswith("linux") or not (BIN / "flower-superlink").exists(),
                       reason="needs Linux (/proc) and Flower's flower-superlink next to this Python"),
]


def _chain(root: Path) -> Path:
    """Three small stores, S004 with a broken transactions file, S005 for the intruder."""
    chain = root / "chain"
    write_chain(generate_chain(ChainSpec(stores=3, members=300, items=200, categories=8, brands=20, seed=5)), chain)
    stores = chain / "stores"
    for new, source in (("S004", "S001"), (INTRUDER, "S002")):
        shutil.copytree(stores / source, stores / new)
        (stores / new / "store.json").write_text(json.dumps({"store_id": new, "name": f"Store {new}"}))
    tx = stores / "S004" / "transactions.csv"
    lines = tx.read_text().splitlines()
    drop = lines[0].split(",").index("quantity")
    tx.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines) + "\n")
    return chain


def _ledger_rounds(chain: Path, store: str) -> list[tuple[str, int]]:
    return [(e.run_id, e.round) for e in read_events(chain / "stores" / store / "state", store)]


def _flwr(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    started = time.time()
    root = tmp_path_factory.mktemp("deploy")
    chain = _chain(root)
    pki = make_dev_pki(root / "certs")
    keys = {s: make_node_key(root / "keys", s) for s in (*REGISTERED, INTRUDER)}
    operator_key, operator_public = make_operator_key(root / "operator")
    home = root / "flwr-home"  # the operator's and the SuperLink's FLWR_HOME
    home.mkdir()
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "chain"\n\n[superlink.chain]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{pki["ca_cert"]}"\n')
    procs = Processes(root / "logs", env)
    out = {"root": root, "chain": chain, "procs": procs, "timings": {}}
    try:
        link = procs.start("superlink", superlink_argv(port, pki, home / "superlink.db"))
        wait_for(lambda: "Uvicorn running on https://" in link.text(), 60, "the SuperLink to listen")
        out["registered"] = register_stores(env, {store: keys[store][1] for store in REGISTERED})

        def supernode(store: str) -> None:
            node_home = root / "nodes" / store
            node_home.mkdir(parents=True, exist_ok=True)
            runtime = free_port()
            procs.start(store, supernode_argv(f"127.0.0.1:{port}", pki["ca_cert"], keys[store][0], runtime,
                                              store_node_config(chain / "stores" / store, chain, operator_public)),
                        env={"FLWR_HOME": str(node_home)})
            if store != INTRUDER:  # turned away by the SuperLink: it never gets a task to execute
                procs.start(f"{store}-exec", store_exec_argv(runtime), log=root / "logs" / f"{store}-exec.log")

        for store in (*REGISTERED, INTRUDER):
            supernode(store)
        wait_for(lambda: all("SuperNode ID:" in procs.procs[s].text() for s in REGISTERED), 60,
                 "the registered SuperNodes to connect")
        wait_for(lambda: procs.procs[INTRUDER].popen.poll() is not None, 60, "the unregistered SuperNode to be refused")
        wait_for(lambda: all("serving storefed" in procs.procs[f"{s}-exec"].text() for s in REGISTERED), 120,
                 "the stores' executors to start")
        out["timings"]["setup_s"] = round(time.time() - started, 1)

        server = root / "server"  # the server holds only the chain's public catalog
        server.mkdir()
        shutil.copy(chain / "catalog.csv", server / "catalog.csv")
        base = (f"data-dir='{server}' stores=4 rounds=3 fraction-evaluate=0.0 node-wait-s=60.0 "
                f"checkpoint-dir='{root / 'checkpoint'}'")
        t = time.time()
        def signed(settings: str) -> list[str]:
            argv = [str(BIN / "flwr"), "run", str(ROOT), "chain", "--stream"]
            for override in signed_run_config(settings, operator_key=operator_key, app=ROOT):
                argv += ["--run-config", override]
            return argv

        run1 = procs.start("run1", signed(f"{base} stop-after-round=2 out-dir='{root / 'run1'}'"))
        # Kill S003's daemon as soon as round 1 is checkpointed: round 2 has just been sent.
        wait_for(lambda: (root / "checkpoint" / "checkpoint.pt").exists() or run1.popen.poll() is not None, 300,
                 "round 1 to end")
        procs.kill("S003")
        procs.kill("S003-exec")
        out["killed_at_s"] = round(time.time() - t, 1)
        run1.popen.wait(timeout=600)
        out["timings"]["run1_s"] = round(time.time() - t, 1)
        out["ledgers_after_run1"] = {s: _ledger_rounds(chain, s) for s in (*REGISTERED, INTRUDER)}
        out["s004_alive"] = procs.procs["S004"].popen.poll() is None

        t = time.time()
        procs.procs["S003-first"] = procs.procs.pop("S003")
        procs.procs["S003-exec-first"] = procs.procs.pop("S003-exec")
        supernode("S003")  # the restarted daemon: same key, same store
        run2 = procs.start("run2", signed(f"{base} resume=true out-dir='{root / 'run2'}'"))
        run2.popen.wait(timeout=600)
        out["timings"]["run2_s"] = round(time.time() - t, 1)
        out["runs"] = [json.loads((root / name / "results.json").read_text()) for name in ("run1", "run2")]
        out["logs"] = {name: procs.procs[name].text() for name in ("run1", "run2", INTRUDER, "superlink")}
        out["run_status"] = _flwr(env, "ls", "chain", "--format", "json").stdout
        yield out
    finally:
        left = procs.stop_all()
        out["timings"]["total_s"] = round(time.time() - started, 1)
        print(f"\ndeployment test timings: {out['timings']}", file=sys.stderr)
    # Every process the test started, and every process Flower started under them, is gone.
    assert left == [], f"still running after the test: {left}"


def _round(results: dict, number: int) -> dict:
    return next(r for r in results["per_round"] if r["round"] == number)


def test_two_rounds_trained_by_the_stores_and_their_ledgers_hold_exactly_those(deployment):
    run1 = deployment["runs"][0]
    assert [r["round"] for r in run1["per_round"]] == [1, 2] and "stopped after round 2" in run1["stopped"]
    assert _round(run1, 1)["participated"] == 3 and _round(run1, 2)["participated"] == 2
    ledgers = deployment["ledgers_after_run1"]
    run_ids = {run_id for store in ("S001", "S002") for run_id, _ in ledgers[store]}
    assert len(run_ids) == 1  # one Flower run
    # Flower's own view: the run finished and completed (`flwr run --stream` exits 0 either way).
    listing = deployment["run_status"]
    status = {r["run-id"]: r["status"] for r in json.loads(listing[listing.index("{"):])["runs"]}
    assert status[run_ids.pop()] == "finished:completed" and len(status) == 2
    assert set(status.values()) == {"finished:completed"}
    for store in ("S001", "S002"):
        assert [r for _, r in ledgers[store]] == [1, 2]
    assert run1["privacy"]["S001"]["rounds_trained"] == 2 and run1["privacy"]["S002"]["rounds_trained"] == 2
    # The server names the stores by what they did, each round.
    log = deployment["logs"]["run1"]
    assert "round 1: trained S001, S002, S003 · refused S004" in log
    assert "round 2: trained S001, S002 · refused S004 · failed S003" in log


def test_a_killed_store_daemon_is_reported_and_the_run_completes_with_the_others(deployment):
    run1 = deployment["runs"][0]
    assert _round(run1, 2)["failed"] == 2  # S003 gone, S004 refusing
    failures = [f for f in run1["failures"] if f["store"] == "S003"]
    assert [f["round"] for f in failures] == [2]
    assert "Node Unavailable" in failures[0]["reason"]
    # S003 trained round 1 before it died; its ledger has at most the rounds it started.
    rounds = [r for _, r in deployment["ledgers_after_run1"]["S003"]]
    assert rounds[:1] == [1] and set(rounds) <= {1, 2}
    assert (deployment["root"] / "run1" / "model.pt").exists()


def test_a_store_with_broken_data_refuses_with_its_reason_and_its_daemon_lives_on(deployment):
    run1 = deployment["runs"][0]
    refusals = [f for f in run1["failures"] if f["store"] == "S004"]
    assert [f["round"] for f in refusals] == [1, 2]
    assert all(f["reason"].startswith("refused:") and "transactions.csv" in f["reason"]
               and "'quantity'" in f["reason"] for f in refusals)
    assert "store S004 refused round 1 (it cannot train)" in deployment["logs"]["run1"]
    assert deployment["s004_alive"]
    assert deployment["ledgers_after_run1"]["S004"] == []


def test_an_unregistered_store_key_is_refused_and_trains_nothing(deployment):
    intruder = deployment["procs"].procs[INTRUDER]
    assert intruder.popen.returncode not in (0, None)
    assert "Failed to initialize the connection to the SuperLink" in deployment["logs"][INTRUDER]
    assert "SuperNode ID:" not in deployment["logs"][INTRUDER]
    assert "No SuperNode found with the given public key" in deployment["logs"]["superlink"]
    assert deployment["ledgers_after_run1"][INTRUDER] == []
    assert not (deployment["chain"] / "stores" / INTRUDER / "state" / "privacy-ledger.jsonl").exists()
    assert INTRUDER not in deployment["runs"][0]["privacy"] and INTRUDER not in deployment["runs"][1]["privacy"]


def test_a_restarted_daemon_rejoins_and_the_resumed_run_keeps_the_ledgers_counting(deployment):
    run2 = deployment["runs"][1]
    assert run2["checkpoint"]["resumed_from"] == 2 and [r["round"] for r in run2["per_round"]] == [1, 2, 3]
    assert _round(run2, 3)["participated"] == 3  # S003 is back
    # with the node id its registered key was given, before and after the restart
    log = deployment["procs"].procs["S003"].text()  # both daemons wrote to S003.log
    assert log.count(f"SuperNode ID: {deployment['registered']['S003']}") == 2
    chain = deployment["chain"]
    first = {run_id for run_id, _ in deployment["ledgers_after_run1"]["S001"]}
    for store in ("S001", "S002"):
        events = _ledger_rounds(chain, store)
        assert [r for _, r in events] == [1, 2, 3]
        assert {run_id for run_id, r in events if r < 3} == first and events[2][0] not in first
    s003 = [r for _, r in _ledger_rounds(chain, "S003")]
    assert s003[0] == 1 and s003[-1] == 3 and set(s003) <= {1, 2, 3}
    assert _ledger_rounds(chain, "S004") == []


def test_storefed_privacy_reads_each_store_s_ledger(deployment, capsys):
    chain = deployment["chain"]
    reports = {}
    for store in ("S001", "S002", "S003"):
        # The CLI's own entry point, in-process (a subprocess per store costs seconds of imports).
        assert main(["privacy", "--store-dir", str(chain / "stores" / store), "--json"]) == 0
        reports[store] = report = json.loads(capsys.readouterr().out)
        events = read_events(chain / "stores" / store / "state", store)
        assert report["store_id"] == store and [e["round"] for e in report["events"]] == [e.round for e in events]
        assert report["epsilon"] == pytest.approx(
            privacy.epsilon([e.mechanism() for e in events], report["delta"], "prv"), rel=1e-9)
        assert 0 < report["epsilon"] <= 8.0
    # What the server last heard from S001 is what S001's own ledger says.
    assert deployment["runs"][1]["privacy"]["S001"]["epsilon"] == pytest.approx(reports["S001"]["epsilon"], rel=1e-6)


def test_the_final_model_reaches_every_store_daemon_that_can_take_it(deployment):
    import torch

    from client.model_store import read_info
    from common.learning.weights import weights_digest

    run1, run2 = deployment["runs"]
    assert "delivery" not in run1  # stopped to be resumed: no final model yet
    digest = weights_digest(torch.load(deployment["root"] / "run2" / "model.pt", weights_only=True))
    assert run2["delivery"]["hash"] == digest and run2["delivery"]["delivered"] == ["S001", "S002", "S003"]
    assert len(run2["delivery"]["failed"]) == 1  # S004 cannot read its data, so it refuses
    for store in ("S001", "S002", "S003"):
        info = read_info(deployment["chain"] / "stores" / store / "state")
        assert info["hash"] == digest and info["round"] == 3 and info["final"] is True
