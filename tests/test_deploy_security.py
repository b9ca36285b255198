"""Issue 14's attacks against a real deployment (`storefed local-deploy up`, 3 stores on loopback).

One deployment, shared with tests/test_deploy.py (tests/deploy_scenario.py runs this scenario
first, on 3 stores). First the operator trains one round with `storefed train`
(a signed run). Then, all at once (independent runs), everything the issue says an outsider
(or a careless operator) could do: unsigned runs of storefed itself (``dp=false``; ``state-dir`` pointing
at an empty directory), an expired signature, a signature by another key, the trained
run's signature replayed, and the foreign app (same publisher, name and version; its
ClientApp would mark the store and send its files), unsigned and even operator-signed.
Every store must refuse each of them, naming why in the server's log; no ledger or nonce
record changes, and no byte of a store's files reaches the server.

Select with ``-m deploy``. The processes are stopped by pid (`storefed local-deploy down`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from client.state.ledger import read_events
from server.train import parse_overrides

STORES = ("S001", "S002", "S003")
REPLY_LOG = "replies.jsonl"  # client.state.reply_log: what the store answered

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (/proc)"),
    # Missing Flower binaries: a skip on a developer's machine, a failure in CI (deploy_harness).
    pytest.mark.usefixtures("deployment_binaries"),
]


@pytest.fixture(scope="module")
def attacked(shared_deployment):
    """The security part of the session's one deployment (tests/deploy_scenario.py)."""
    return shared_deployment["security"]


def test_a_signed_run_trains_and_its_ledger_events_are_in_the_store_s_own_state_dir(attacked):
    train = attacked["train"]
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads(train.stdout)
    assert {"per_round", "privacy", "failures", "model"} <= set(results)  # the object `simulate --json` prints
    assert [r["participated"] for r in results["per_round"]] == [3] and results["failures"] == []
    assert "[round 1/1] 3 stores trained" in train.stderr  # the per-round line, streamed
    for store in STORES:
        info = attacked["record"]["stores"][store]
        assert info["state_dir"] == str(Path(info["store_dir"]) / "state")
        assert read_events(Path(info["state_dir"]), store)[:1] == attacked["events_after_train"][store][:1]
        events = attacked["events_after_train"][store]
        # The run's explore release (DESIGN §5.3, round 0), then its one round.
        assert [e.round for e in events[:2]] == [0, 1] and results["privacy"][store]["rounds_trained"] == 1
    for store in STORES:
        events = attacked["events_after_train"][store]  # read right after the train run
        nonces = json.loads(attacked["state_after_train"][store]["run-nonces.json"])
        # Two events (release and round), of the one run this store accepted, whose nonce it
        # recorded with the run id.
        assert len(events) == 2 and {e.run_id for e in events} == {events[0].run_id}
        assert [v["run_id"] for v in nonces.values()] == [events[0].run_id]


REASONS = {
    "unsigned": "the run is not signed",
    "expired": "the run's authorization expired at",
    "other key": "not by this chain's operator key",
    "replayed": "replayed run: nonce",
}


@pytest.mark.parametrize("attack", sorted(REASONS))
def test_every_store_refuses_the_run_and_the_server_log_says_why(attacked, attack):
    (code, results), log = attacked["attacks"][attack]
    assert code == 0, log[-3000:]  # Flower completes the run: the server stays up, only the stores say no
    assert [r["participated"] for r in results["per_round"]] == [0]
    refusals = {f["store"]: f["reason"] for f in results["failures"]}
    assert set(refusals) == set(STORES)
    for store in STORES:
        assert refusals[store].startswith("refused:") and REASONS[attack] in refusals[store]
        assert f"store {store} refused round 1 (it cannot train): " in log
    assert REASONS[attack] in log


def test_no_attack_changed_a_ledger_or_a_nonce_record_or_wrote_where_the_run_said(attacked):
    # The one new nonce: the foreign app the operator signed (its authorization held; the
    # store then refused the run with its own installed code, before reading any data).
    foreign_nonce = parse_overrides(attacked["foreign_signed_overrides"])["run-nonce"]
    for store in STORES:
        before, after = attacked["state_before_attacks"][store], attacked["state_after_attacks"][store]
        assert set(after) == set(before) and "privacy-ledger.jsonl" in after
        assert after["privacy-ledger.jsonl"] == before["privacy-ledger.jsonl"]
        assert {k: v for k, v in after.items() if k not in ("run-nonces.json", REPLY_LOG)} == \
            {k: v for k, v in before.items() if k not in ("run-nonces.json", REPLY_LOG)}
        # The store's log of what it answered (its privacy page) gained only refusals: no
        # attack got a reply with a value or a model in it.
        old_log = before[REPLY_LOG]
        assert after[REPLY_LOG].startswith(old_log)
        added = [json.loads(line) for line in after[REPLY_LOG][len(old_log):].decode().splitlines() if line]
        assert added and all(e["outcome"] == "refused" and e["arrays"] is None for e in added), added
        nonces_before = json.loads(before["run-nonces.json"])
        nonces_after = json.loads(after["run-nonces.json"])
        assert set(nonces_after) == set(nonces_before) | {foreign_nonce}
        assert {k: nonces_after[k] for k in nonces_before} == nonces_before
    assert list(attacked["empty"].iterdir()) == []  # state-dir from the run config: never used


def test_the_foreign_app_is_refused_by_every_store_and_none_of_its_code_ran(attacked):
    for variant, why in (("unsigned", "the run is not signed"), ("signed", "unknown run config key 'out'")):
        replies = attacked["foreign"][variant]
        assert len(replies) == 3 and all("content" not in r for r in replies), replies
        assert all("storefed-refuse" in r["error"] and why in r["error"] for r in replies), replies
        (code, _), _log = attacked["attacks"][f"foreign {variant}"]
        assert code == 1  # no results.json: storefed train would say the run produced nothing
    for store in STORES:
        store_dir = Path(attacked["record"]["stores"][store]["store_dir"])
        assert not (store_dir / "FOREIGN-CODE-RAN").exists()
        # No byte of the store's files in anything the server received or logged.
        first_receipt = (store_dir / "transactions.csv").read_text().splitlines()[1]
        first_member = (store_dir / "members.csv").read_text().splitlines()[1]
        seen = json.dumps(attacked["foreign"]) + "".join(log for _, log in attacked["attacks"].values())
        assert first_receipt not in seen and first_member not in seen
