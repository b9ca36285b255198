"""The deployed system with real processes on loopback: a SuperLink with TLS and SuperNode
authentication, one store daemon per store (a SuperNode in process isolation and storefed's
executor, started with the command lines of simulations/deploy/local_deploy.py), runs signed with
the operator key (server/train.py) against a federation in FLWR_HOME.

One scenario (the tests below each check one part of it), run once per session on the
deployment tests/test_deploy_security.py also uses (tests/deploy_scenario.py builds it with
``storefed local-deploy up`` and runs that file's attacks first; ledger and run-list checks here
count from the state just before step 4):

1. a development CA and server certificate, a key pair per store;
2. SuperLink with TLS, ``--enable-supernode-auth`` and a state database; stores S001–S004
   registered with ``flwr supernode register`` (S001–S003 by local-deploy, S004 after);
3. SuperNodes for S001–S004 (S004's transactions lack a column: it must refuse, not crash),
   and a fifth SuperNode whose key nobody registered (store S005): it must be turned away;
4. a signed ``flwr run`` of 3 rounds that stops after round 2 (as a server stop would); S003's daemon
   is killed (SIGKILL) while it trains round 2;
5. S003's daemon restarts and rejoins, and a signed ``flwr run`` with ``resume=true`` trains round 3.

Select with ``-m deploy``, skip with ``-m "not deploy"``. Much of this scenario's time is
Flower's heartbeat timeout for the killed daemon; the processes are stopped by pid as soon as
the scenario ends, whatever happened.
"""

from __future__ import annotations

import json
import sys

import pytest

from client.state.ledger import read_events, read_ledger
from common.privacy import accountant as privacy
from simulations.cli import main
from deploy_scenario import INTRUDER, ledger_rounds as _ledger_rounds

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc)"),
    # Missing Flower binaries: a skip on a developer's machine, a failure in CI (deploy_harness).
    pytest.mark.usefixtures("deployment_binaries"),
]


@pytest.fixture(scope="module")
def deployment(shared_deployment):
    """This scenario's part of the session's one deployment (tests/deploy_scenario.py)."""
    return shared_deployment["deploy"]


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
    status = {str(r["run-id"]): r["status"] for r in json.loads(listing[listing.index("{"):])["runs"]}
    status = {run_id: s for run_id, s in status.items() if run_id not in deployment["runs_before"]}
    assert status[run_ids.pop()] == "finished:completed" and len(status) == 2
    assert set(status.values()) == {"finished:completed"}
    for store in ("S001", "S002"):  # the run's explore release (round 0, DESIGN §5.3), then its rounds
        assert [r for _, r in ledgers[store]] == [0, 1, 2]
    # The three stores that can read their data released, from their secure noise; S004 refused.
    assert run1["explore_prior"]["released"] == ["S001", "S002", "S003"]
    assert [f["store"] for f in run1["explore_prior"]["failed"]] == ["S004"]
    assert "explore prior from 3 stores' DP releases; 1 did not release: S004:" in deployment["logs"]["run1"]
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
    # S003 released and trained round 1 before it died; its ledger has at most the rounds it started.
    rounds = [r for _, r in deployment["ledgers_after_run1"]["S003"]]
    assert rounds[:2] == [0, 1] and set(rounds) <= {0, 1, 2}
    assert (deployment["root"] / "run1" / "model.pt").exists()


def test_a_store_killed_mid_training_keeps_that_round_counted_and_nothing_is_double_spent(deployment, capsys):
    # S003 was killed while it trained round 2: its ledger's last record was that reservation.
    last = json.loads(deployment["s003_ledger_after_kill"].splitlines()[-1])
    assert last["type"] == "reservation" and last["round"] == 2
    run1 = {run_id for run_id, _ in deployment["ledgers_after_run1"]["S001"]}.pop()
    state = deployment["chain"] / "stores" / "S003" / "state"
    ledger = read_ledger(state, "S003")  # verifies against its head, as the restarted daemon did
    # The round it died in stays an open reservation, counted as spent (DESIGN: a crash
    # over-counts, never under-counts); it never became an event, and no round counts twice.
    assert [(r.planned.run_id, r.planned.round) for r in ledger.open] == [(last["run_id"], 2)]
    assert last["run_id"] == run1
    events = [(e.run_id, e.round) for e in ledger.events]
    assert (run1, 2) not in events and len(events) == len(set(events))
    # The restarted daemon trained round 3 of the resumed run and counted the reservation in
    # what it reported; the operator sees it listed, to be cleared by hand.
    reported = deployment["runs"][1]["privacy"]["S003"]
    assert reported["rounds_trained"] == 1  # round 3: the resumed run is a new Flower run
    assert reported["epsilon"] == pytest.approx(privacy.epsilon(ledger.counted(), reported["delta"], "prv"), rel=1e-6)
    assert reported["epsilon"] > privacy.epsilon(ledger.history(), reported["delta"], "prv")
    assert main(["privacy", "--store-dir", str(deployment["chain"] / "stores" / "S003"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["reservations"]
    assert [(r["run_id"], r["round"]) for r in listed] == [(run1, 2)]


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
        events = _ledger_rounds(chain, store)[len(deployment["ledgers_before_run1"][store]):]
        # The resumed run has its prior in the checkpoint's model: no second release.
        assert [r for _, r in events] == [0, 1, 2, 3]
        assert {run_id for run_id, r in events if r < 3} == first and events[3][0] not in first
    s003 = [r for _, r in _ledger_rounds(chain, "S003")[len(deployment["ledgers_before_run1"]["S003"]):]]
    assert s003[:2] == [0, 1] and s003[-1] == 3 and set(s003) <= {0, 1, 2, 3}
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
        # Open reservations (S003's, killed mid-training) count as spent.
        reserved = read_ledger(chain / "stores" / store / "state", store).reserved()
        assert report["epsilon"] == pytest.approx(
            privacy.epsilon([e.mechanism() for e in events] + reserved, report["delta"], "prv"), rel=1e-9)
        assert 0 < report["epsilon"] <= 8.0
    # What the server last heard from S001 is what S001's own ledger says.
    assert deployment["runs"][1]["privacy"]["S001"]["epsilon"] == pytest.approx(reports["S001"]["epsilon"], rel=1e-6)


def test_the_final_model_reaches_every_store_daemon_that_can_take_it(deployment):
    import torch

    from client.state.model_store import read_info
    from common.learning.weights import weights_digest

    run1, run2 = deployment["runs"]
    assert "delivery" not in run1  # stopped to be resumed: no final model yet
    digest = weights_digest(torch.load(deployment["root"] / "run2" / "model.pt", weights_only=True))
    assert run2["delivery"]["hash"] == digest and run2["delivery"]["delivered"] == ["S001", "S002", "S003"]
    assert len(run2["delivery"]["failed"]) == 1  # S004 cannot read its data, so it refuses
    for store in ("S001", "S002", "S003"):
        info = read_info(deployment["chain"] / "stores" / store / "state")
        assert info["hash"] == digest and info["round"] == 3 and info["final"] is True
