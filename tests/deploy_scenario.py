"""The one real deployment the deploy tests share (tests/test_deploy_security.py, then
tests/test_deploy.py check parts of it): starting a SuperLink with TLS and node auth, its
SuperNodes and store executors costs tens of seconds on 2 cores, so it is done once per session.

1. ``storefed local-deploy up`` (simulations/deploy/local_deploy.py): 3 stores S001–S003.
2. Issue 14's scenario: the operator trains one round with ``storefed train`` (at a low target ε,
   so the stores keep budget for step 4, see TRAIN_TARGET_EPSILON), then the attacks run, all at once.
3. Two more stores join as test_deploy.py needs them: S004 (registered, its transactions lack a
   column: it must refuse, not crash) and S005, whose key nobody registered (turned away).
4. A signed run of 3 rounds that stops after round 2; S003's daemon is killed (SIGKILL) while it
   trains round 2 (its reservation is on disk); S003 restarts and a signed ``resume=true`` run
   trains round 3.

Ledgers and Flower's run list then hold both scenarios, so what step 4 checks is taken relative
to the state just before it (ledgers are append-only). Every process is stopped by pid as soon as
the scenario ends, before the tests read what it recorded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from client.state.ledger import read_events
from client.daemon.node_key import make_node_key
from server.operator_key import make_operator_key
from simulations.deploy import local_deploy
from simulations.deploy.processes import BIN, Processes, alive, descendants, free_port, start_time, wait_for
from server.train import signed_run_config, start_and_wait

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = Path(__file__).resolve().parent / "foreign_app"
SECURITY_STORES = ("S001", "S002", "S003")
REGISTERED = ("S001", "S002", "S003", "S004")
INTRUDER = "S005"
# Each run is calibrated so that its planned rounds alone reach its ε target, and a store's
# budget (8) caps the total over all runs: the two scenarios' runs share S001–S003's budget,
# so their targets add up to well under 8 (the checks are about refusals and ledgers, not ε).
TRAIN_TARGET_EPSILON = 1.0
DEPLOY_TARGET_EPSILON = 5.0


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def ledger_rounds(chain: Path, store: str) -> list[tuple[str, int]]:
    return [(e.run_id, e.round) for e in read_events(chain / "stores" / store / "state", store)]


def _flwr(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _run_ids(listing: str) -> dict[str, str]:
    return {str(r["run-id"]): r["status"] for r in json.loads(listing[listing.index("{"):])["runs"]}


def _add_stores(chain: Path) -> None:
    """S004 (a copy of S001 whose transactions lack 'quantity') and S005 (a copy of S002), without
    their sources' state: a new store has no ledger."""
    stores = chain / "stores"
    for new, source in (("S004", "S001"), (INTRUDER, "S002")):
        shutil.copytree(stores / source, stores / new, ignore=shutil.ignore_patterns("state"))
        (stores / new / "store.json").write_text(json.dumps({"store_id": new, "name": f"Store {new}"}))
    tx = stores / "S004" / "transactions.csv"
    lines = tx.read_text().splitlines()
    drop = lines[0].split(",").index("quantity")
    tx.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines) + "\n")


class _LaunchGate(io.StringIO):
    """A run's streamed lines. Holds ``lock`` from creation until the run's ServerApp process
    has connected to the SuperLink (its first line, "Start `flwr-serverapp` process", comes
    through the SuperLink's log stream) or the run ended."""

    CONNECTED = "Start `flwr-serverapp` process"

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        lock.acquire()
        self._lock: threading.Lock | None = lock

    def write(self, text: str) -> int:
        written = super().write(text)
        if self.CONNECTED in text:
            self.launched()
        return written

    def launched(self) -> None:
        if self._lock is not None:
            self._lock, lock = None, self._lock
            lock.release()


def _security(root: Path, record: dict, out: dict) -> None:
    """Issue 14: one signed round through the CLI, then every attack (each a run the stores refuse)."""
    home, fed = Path(record["flwr_home"]), record["federation"]
    base = record["run_config"]
    key = Path(record["operator_key"])
    trained = f"{base} rounds=1 target-epsilon={TRAIN_TARGET_EPSILON} out-dir='{root / 'trained'}'"
    t = time.time()
    train = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "train", fed, "--json", "--operator-key", str(key),
         "--run-config", trained],
        env={**local_deploy.flower_env(home)}, capture_output=True, text=True, timeout=600)
    out["train"] = train
    out["timings"]["train_s"] = round(time.time() - t, 1)
    state = {s: Path(record["stores"][s]["state_dir"]) for s in SECURITY_STORES}
    out["state_after_train"] = {s: files(state[s]) for s in SECURITY_STORES}
    out["events_after_train"] = {s: read_events(state[s], s) for s in SECURITY_STORES}

    empty = root / "empty-state"
    empty.mkdir()
    other_private, _ = make_operator_key(root / "other-operator")

    def outdir(name: str) -> str:
        return f" out-dir='{root / name}'"

    authorization = re.search(r'authorization --run-config "([^"]+)"', train.stderr)
    assert authorization, train.stderr[-3000:]
    attacks = {
        # issue 14's first table, in one unsigned run: no DP, and a ledger in a directory the server names
        "unsigned": [f"{base} rounds=1 dp=false state-dir='{empty}'{outdir('unsigned')}"],
        "expired": signed_run_config(f"{base} rounds=1{outdir('expired')}", operator_key=key,
                                     valid_for=timedelta(seconds=-60)),
        "other key": signed_run_config(f"{base} rounds=1{outdir('otherkey')}", operator_key=other_private),
        # the operator's trained run, sent again: same settings, same signature
        "replayed": [trained, authorization.group(1)],
        "foreign unsigned": [f"out='{root / 'foreign-unsigned.json'}'"],
        "foreign signed": signed_run_config(f"out='{root / 'foreign-signed.json'}'", operator_key=key, app=FOREIGN),
    }
    out["state_before_attacks"] = out["state_after_train"]
    out["foreign_signed_overrides"] = attacks["foreign signed"]
    t = time.time()
    # The attacks are independent runs, so they overlap: one after the other they cost
    # 6 × (CLI and ServerApp start-ups, Flower's 3 s polls, `flwr ls`). Each store's daemon
    # still answers one task at a time (its executor is sequential). Only the launches take
    # turns: the SuperLink gives a ServerApp process 30 s from being claimed to connect, which
    # six starting at once on a busy 2-core machine can miss.
    launching = threading.Lock()

    def attack(name: str) -> tuple[tuple[int, dict | None], str]:
        app = FOREIGN if name.startswith("foreign") else ROOT
        lines = _LaunchGate(launching)
        try:
            return start_and_wait(fed, attacks[name], flwr_home=home, app=app, lines=lines), lines.getvalue()
        finally:
            lines.launched()  # the run ended (or never connected): let the next one launch

    with ThreadPoolExecutor(max_workers=len(attacks)) as pool:
        out["attacks"] = dict(zip(attacks, pool.map(attack, attacks)))
    out["timings"]["attacks_s"] = round(time.time() - t, 1)
    out["state_after_attacks"] = {s: files(state[s]) for s in SECURITY_STORES}
    out["foreign"] = {v: json.loads((root / f"foreign-{v}.json").read_text()) for v in ("unsigned", "signed")}
    out.update(record=record, root=root, empty=empty)


def _kill_recorded(pid: int) -> None:
    """SIGKILL a process ``local-deploy up`` started (it leads its own group) and all below it."""
    family = {p: start_time(p) for p in (pid, *descendants(pid))}
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p, started in family.items():
        if alive(p, started):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_for(lambda: not any(alive(p, s) for p, s in family.items()), 15, f"process {pid} to die")


def _training(ledger_file: Path, server_round: int) -> bool:
    """True while the ledger's last record is a reservation of ``server_round``: the store is training it."""
    try:
        last = json.loads(ledger_file.read_text().splitlines()[-1])
    except (OSError, IndexError, ValueError):  # not there yet, or caught mid-rename
        return False
    return last.get("type") == "reservation" and last.get("round") == server_round


def _deploy(root: Path, record: dict, out: dict, timings: dict) -> None:
    """test_deploy.py's scenario on the running deployment, with the stores it adds."""
    deployment = Path(record["chain"]).parent
    chain = Path(record["chain"])
    home = Path(record["flwr_home"])
    env = local_deploy.flower_env(home)
    operator_key, operator_public = Path(record["operator_key"]), Path(record["operator_public_key"])
    ca_cert = Path(record["ca_cert"])
    port = int(record["superlink"].rsplit(":", 1)[1])
    keys = {s: (deployment / "store-keys" / s, deployment / "store-keys" / f"{s}.pub") for s in SECURITY_STORES}
    keys.update({s: make_node_key(root / "keys", s) for s in ("S004", INTRUDER)})
    procs = Processes(Path(record["logs"]), env)  # the restarted S003 appends to S003.log
    out.update(root=root, chain=chain, procs=procs)
    started = time.time()
    try:
        out["registered"] = {**record["node_ids"], **local_deploy.register_stores(env, {"S004": keys["S004"][1]})}

        def supernode(store: str) -> None:
            node_home = deployment / "nodes" / store
            node_home.mkdir(parents=True, exist_ok=True)
            runtime = free_port()
            procs.start(store, local_deploy.supernode_argv(
                f"127.0.0.1:{port}", ca_cert, keys[store][0], runtime,
                local_deploy.store_node_config(chain / "stores" / store, chain, operator_public)),
                env={"FLWR_HOME": str(node_home)})
            if store != INTRUDER:  # turned away by the SuperLink: it never gets a task to execute
                procs.start(f"{store}-exec", local_deploy.store_exec_argv(runtime))

        for store in ("S004", INTRUDER):
            supernode(store)
        wait_for(lambda: "SuperNode ID:" in procs.procs["S004"].text(), 60, "S004's SuperNode to connect")
        wait_for(lambda: procs.procs[INTRUDER].popen.poll() is not None, 60, "the unregistered SuperNode to be refused")
        wait_for(lambda: "serving storefed" in procs.procs["S004-exec"].text(), 120, "S004's executor to start")
        timings["deploy_setup_s"] = round(time.time() - started, 1)

        server = deployment / "server"  # local-deploy's: only the chain's public catalog
        base = (f"data-dir='{server}' stores=4 rounds=3 target-epsilon={DEPLOY_TARGET_EPSILON} fraction-evaluate=0.0 "
                f"node-wait-s=60.0 "
                f"checkpoint-dir='{root / 'checkpoint'}'")

        def signed(settings: str) -> list[str]:
            argv = [str(BIN / "flwr"), "run", str(ROOT), "chain", "--stream"]
            for override in signed_run_config(settings, operator_key=operator_key, app=ROOT):
                argv += ["--run-config", override]
            return argv

        out["runs_before"] = set(_run_ids(_flwr(env, "ls", "chain", "--format", "json").stdout))
        before = {s: ledger_rounds(chain, s) for s in (*REGISTERED, INTRUDER)}
        out["ledgers_before_run1"] = before
        t = time.time()
        run1 = procs.start("run1", signed(f"{base} stop-after-round=2 out-dir='{root / 'run1'}'"))
        # Kill S003's daemon mid-training: once round 1 is checkpointed (round 2 has just been
        # sent) and S003's ledger holds its round-2 reservation (written before DP-SGD starts).
        wait_for(lambda: (root / "checkpoint" / "checkpoint.pt").exists() or run1.popen.poll() is not None, 300,
                 "round 1 to end")
        s003_ledger = chain / "stores" / "S003" / "state" / "privacy-ledger.jsonl"
        wait_for(lambda: _training(s003_ledger, 2) or run1.popen.poll() is not None, 300,
                 "S003 to start training round 2", every=0.05)
        _kill_recorded(record["stores"]["S003"]["exec_pid"])  # the executor trains: first
        _kill_recorded(record["stores"]["S003"]["pid"])
        out["killed_at_s"] = round(time.time() - t, 1)
        out["s003_ledger_after_kill"] = s003_ledger.read_text()
        run1.popen.wait(timeout=600)
        timings["run1_s"] = round(time.time() - t, 1)
        # What run 1 added to each ledger (a ledger only grows).
        out["ledgers_after_run1"] = {s: ledger_rounds(chain, s)[len(before[s]):] for s in before}
        out["s004_alive"] = procs.procs["S004"].popen.poll() is None

        t = time.time()
        supernode("S003")  # the restarted daemon: same key, same store
        run2 = procs.start("run2", signed(f"{base} resume=true out-dir='{root / 'run2'}'"))
        run2.popen.wait(timeout=600)
        timings["run2_s"] = round(time.time() - t, 1)
        out["runs"] = [json.loads((root / name / "results.json").read_text()) for name in ("run1", "run2")]
        out["logs"] = {name: procs.procs[name].text() for name in ("run1", "run2", INTRUDER)}
        out["logs"]["superlink"] = (Path(record["logs"]) / "superlink.log").read_text(errors="replace")
        out["run_status"] = _flwr(env, "ls", "chain", "--format", "json").stdout
    finally:
        out["left"] = procs.stop_all()


def shared_deployment(root: Path):
    """Generator for the session fixture: runs the whole scenario, stops every process (the
    tests only read what it recorded and the files it left, so nothing keeps polling on the
    machine while the rest of the suite runs), yields {"security": …, "deploy": …}, then
    asserts that no process was left."""
    started = time.time()
    timings: dict = {}
    security: dict = {"timings": timings}
    deploy: dict = {"timings": timings}
    record = local_deploy.up(root / "deployment", stores=3, seed=1)
    left: list[int] = []
    try:
        timings["up_s"] = round(time.time() - started, 1)
        _add_stores(Path(record["chain"]))
        (root / "security").mkdir()
        _security(root / "security", record, security)
        (root / "deploy").mkdir()
        _deploy(root / "deploy", record, deploy, timings)
    finally:
        left = [*deploy.get("left", []), *local_deploy.down(root / "deployment")]
        timings["total_s"] = round(time.time() - started, 1)
        print(f"\nshared deployment timings: {timings}", file=sys.stderr)
    yield {"security": security, "deploy": deploy}
    assert left == [], f"still running after the scenario: {left}"
