"""The privacy ledger as a store keeps it: one budget at a time (reservations under the
store's lock) and tamper evidence (hash chain + head), with the operator's repairs."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client.state import ledger as store_ledger
from client.state.ledger import head_path, ledger_path, read_events, read_ledger
from common.config import DEFAULTS
from common.exchange import wire
from common.privacy import accountant as privacy
from common.privacy.ledger import LedgerError, PrivacyEvent, budget_decision, merged
from client.state import privacy_report as report
from simulations.cli import main

DELTA = 1e-6
MECH = (1.1, 0.08, 13)


def _event(run_id, rnd, steps=13):
    return PrivacyEvent(run_id=run_id, round=rnd, noise_multiplier=MECH[0], sample_rate=MECH[1], steps=steps,
                        clip_norm=1.0, accountant="prv", at="2026-01-01T00:00:00+00:00", delta=DELTA)


def _eps(history):
    return privacy.epsilon(history, DELTA, "prv")


def _check(budget):
    return lambda history, reserved, new: budget_decision(history, reserved, new, budget, _eps)


def _store_dir(tmp_path, store_id="S1"):
    store = tmp_path / "stores" / store_id
    store.mkdir(parents=True)
    (store / "store.json").write_text(json.dumps({"store_id": store_id, "name": "n", "region": "r",
                                                  "opened": "2020-01-01"}))
    return store


# --- one budget at a time --------------------------------------------------------------------

def test_the_budget_check_counts_open_reservations_and_fails_on_nan():
    one = _eps([MECH])
    two = _eps([MECH, MECH])
    assert one < two
    budget = (one + two) / 2  # room for one round, not two
    assert budget_decision([], [], MECH, budget, _eps).fits
    declined = budget_decision([], [MECH], MECH, budget, _eps)  # another run's round is open
    assert not declined.fits and declined.after == pytest.approx(two) and declined.spent == pytest.approx(one)
    assert not budget_decision([], [], MECH, budget, lambda h: float("nan")).fits
    assert not budget_decision([], [], MECH, float("nan"), _eps).fits


def test_a_crashed_reservation_counts_as_spent_until_its_operator_clears_it(tmp_path, capsys, monkeypatch):
    store, state = _store_dir(tmp_path), tmp_path / "state"
    store_ledger.append_event(state, "S1", _event("done", 1))
    one, two, three = _eps([MECH]), _eps([MECH] * 2), _eps([MECH] * 3)
    budget = (two + three) / 2  # the ledger's event plus one more round
    decision, crashed = store_ledger.reserve(state, "S1", _event("crashed", 2), _check(budget), _eps)
    assert decision.fits and crashed is not None
    # The run "crashes" here: it neither commits nor releases. The next run cannot use the room.
    decision, none = store_ledger.reserve(state, "S1", _event("next", 1), _check(budget), _eps)
    assert none is None and not decision.fits and decision.spent == pytest.approx(two)
    assert read_events(state, "S1") == [_event("done", 1)]  # the reservation is not an event
    assert main(["privacy", "--store-dir", str(store), "--state-dir", str(state)]) == 0
    listed = capsys.readouterr().out
    assert crashed.id in listed and "run crashed round 2" in listed

    # Without --yes the command asks; no answer changes nothing.
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    argv = ["privacy", "--store-dir", str(store), "--state-dir", str(state), "--clear-reservation", crashed.id]
    assert main(argv) == 1
    assert [r.id for r in read_ledger(state, "S1").open] == [crashed.id]
    capsys.readouterr()
    assert main(argv + ["--yes"]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert said == (f"the reservation of run crashed round 2 (ε {one:.3f}) is released; "
                    f"the store's spend drops from {two:.3f} to {one:.3f}")
    assert read_ledger(state, "S1").open == ()
    decision, again = store_ledger.reserve(state, "S1", _event("next", 1), _check(budget), _eps)
    assert decision.fits and again is not None


def test_a_failed_training_releases_its_reservation_and_a_commit_replaces_it(tmp_path):
    state = tmp_path / "state"
    _, r1 = store_ledger.reserve(state, "S1", _event("a", 1), _check(100.0))
    store_ledger.release(state, "S1", r1.id, "training failed (RuntimeError)")
    _, r2 = store_ledger.reserve(state, "S1", _event("a", 2), _check(100.0))
    ledger = store_ledger.commit(state, "S1", r2.id, _event("a", 2, steps=12))  # as trained: 12 steps
    assert ledger.open == () and ledger.events == (_event("a", 2, steps=12),)
    assert [json.loads(x)["type"] for x in ledger_path(state).read_text().splitlines()[1:]] == \
        ["reservation", "release", "reservation", "event"]
    with pytest.raises(LedgerError, match="no open reservation"):
        store_ledger.release(state, "S1", r1.id, "twice")


def _deployed(chain_dir, state_dir, run_id=1, **extra):
    # A fixed σ: no calibration to wait for in each process.
    return Context(run_id=run_id, node_id=7, run_config={"data-dir": str(chain_dir), "rounds": 2, "stores": 3,
                                                         "noise-multiplier": 1.0},
                   state=RecordDict(),
                   node_config={"store-dir": str(chain_dir / "stores" / "S003"), "catalog": str(chain_dir),
                                "state-dir": str(state_dir), **extra})


def _train_message(chain_dir):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from common.data.dataset import ItemIndex
    from common.data.storefiles import read_catalog
    from common.learning.model import Recommender

    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


# S003 of the small chain has 400 training members and declares 500 in store.json: both give
# ⌈n/128⌉ = 4 steps an epoch. The node config here declares 250 instead (⌈250/128⌉ = 2), so a
# plan that followed the exact count (q = 1/4, 4 steps an epoch) or store.json's size is told apart.
PUBLISHED = 250
EPOCHS = int(DEFAULTS["local-epochs"])  # the run config's default: 2
PLAN = (1.0, 1 / 2, EPOCHS * 2)  # σ as configured, q = 1/⌈250/128⌉, steps = 2 epochs × ⌈250/128⌉
PLAN_DELTA = 1e-6  # min(1e-6, 1/(10 × 250))


def _train_at_store(args):
    """One store process receiving a train message of its own run (waits for the other at the barrier)."""
    chain_dir, state_dir, budget, run_id, barrier, out = args
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import handle_train
    from client.store import load_store
    from common.config import RunConfig

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 7
    context = _deployed(chain_dir, state_dir, run_id, **{"epsilon-budget": budget, "published-size": PUBLISHED})
    cfg = RunConfig.from_mapping(context.run_config)
    load_store(context.node_config, cfg)  # data ready before the race starts
    barrier.wait(timeout=120)
    reply = handle_train(_train_message(chain_dir), context, cfg)
    if reply.has_error() and reply.error.code == wire.DECLINE_CODE:
        out.put((run_id, "declined", wire.parse_decline(reply.error.reason)))
    elif not reply.has_error():
        out.put((run_id, "trained", dict(reply.content["metrics"])))
    else:
        out.put((run_id, f"error {reply.error.code}", reply.error.reason))


def test_two_runs_at_one_store_with_budget_for_one_round_train_once(small_chain_dir, tmp_path):
    from client.store import load_store
    from common.config import RunConfig

    node = load_store({"store-dir": str(small_chain_dir / "stores" / "S003"), "catalog": str(small_chain_dir)},
                      RunConfig.from_mapping({}))
    assert EPOCHS * -(-node.data.n_train_members // 128) != PLAN[2], "the sizes must give different step counts"
    one, two = _eps_at([PLAN], PLAN_DELTA), _eps_at([PLAN] * 2, PLAN_DELTA)
    budget = (one + two) / 2

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited torch threads
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_train_at_store,
                         args=((small_chain_dir, tmp_path / "state", budget, run_id, barrier, out),))
             for run_id in (11, 12)]
    for p in procs:
        p.start()
    try:
        results = sorted((out.get(timeout=240) for _ in procs), key=lambda r: r[1])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [r[1] for r in results] == ["declined", "trained"], results
    (_, _, declined), (winner, _, metrics) = results
    # The loser saw the winner's round as spent (its reservation, or its committed event).
    assert declined["epsilon"] == pytest.approx(one, rel=1e-9) and declined["epsilon-after"] == pytest.approx(two, rel=1e-9)
    assert metrics["num-examples"] == PUBLISHED and metrics["epsilon"] == pytest.approx(one, rel=1e-9)
    ledger = read_ledger(tmp_path / "state", "S003")
    assert len(ledger.events) == 1 and ledger.open == ()
    assert ledger.history() == [PLAN] and ledger.events[0].delta == PLAN_DELTA
    assert ledger.events[0].run_id == str(winner)


def _eps_at(history, delta):
    return privacy.epsilon(history, delta, "prv")


# --- tamper evidence -------------------------------------------------------------------------

def _three_rounds(state):
    for rnd in (1, 2, 3):
        _, r = store_ledger.reserve(state, "S003", _event("r", rnd), _check(1000.0), _eps)
        store_ledger.commit(state, "S003", r.id, _event("r", rnd), _eps)


def _damage(state, how):
    path = ledger_path(state)
    lines = path.read_text().splitlines(keepends=True)
    if how == "cut_two":
        path.write_text("".join(lines[:-2]))
    elif how == "altered":  # someone lowers the recorded steps of a round
        lines[2] = lines[2].replace('"steps": 13', '"steps": 1')
        path.write_text("".join(lines))
    elif how == "rehashed":  # ... and recomputes the whole chain after it
        from common.privacy.ledger import append, new_ledger
        fake = new_ledger("S003")
        for line in lines[1:]:
            body = {k: v for k, v in json.loads(line).items() if k not in ("seq", "prev_hash", "hash")}
            if body.get("steps") == 13 and body["type"] == "event":
                body["steps"] = 1
            fake = append(fake, body)
        path.write_text("\n".join(fake.lines) + "\n")
    elif how == "ledger_deleted":
        path.unlink()
    elif how == "head_deleted":
        head_path(state).unlink()
    return head_path(state) if how == "head_deleted" else path


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("how", ["cut_two", "altered", "rehashed", "ledger_deleted", "head_deleted"])
def test_a_damaged_ledger_is_refused_naming_the_file_and_nothing_trains(small_chain_dir, tmp_path, capsys, how):
    from client.client_app import handle_train, refuse_when_unusable
    from common.config import RunConfig

    state = tmp_path / "state"
    _three_rounds(state)
    named = _damage(state, how)
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    with pytest.raises(LedgerError, match=str(named)):
        read_events(state, "S003")
    context = _deployed(small_chain_dir, state)
    msg = _train_message(small_chain_dir)
    reply = refuse_when_unusable(msg, context, lambda: handle_train(msg, context, RunConfig.from_mapping(context.run_config)))
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    assert str(named) in wire.parse_refusal(reply.error.reason)["reason"]
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before  # nothing written
    capsys.readouterr()
    store = small_chain_dir / "stores" / "S003"
    assert main(["privacy", "--store-dir", str(store), "--state-dir", str(state)]) == 2
    assert str(named) in capsys.readouterr().err


@pytest.mark.parametrize("how", ["cut_two", "altered", "rehashed", "ledger_deleted"])
def test_a_repair_keeps_at_least_the_spend_the_head_recorded(tmp_path, how):
    store, state = _store_dir(tmp_path, "S003"), tmp_path / "state"
    _three_rounds(state)
    recorded = _eps([MECH] * 3)
    _damage(state, how)
    done, what = report.repair(store, state, confirm=lambda question: True)
    assert done and f"ε {recorded:.3f}" in what
    ledger = read_ledger(state, "S003")  # reads again, verified against the new head
    # Per (σ, q) the repaired ledger holds all 39 steps the head counted, so ε is the same.
    assert merged(ledger.history()) == ((MECH[0], MECH[1], 39),)
    assert _eps(ledger.history()) == pytest.approx(recorded)
    # Records that still verify are kept (a rehashed chain verifies: the lost-spend events
    # make up the steps its edits removed).
    kept = {"cut_two": 2, "altered": 0, "rehashed": 3, "ledger_deleted": 0}[how]
    assert sum(e.run_id == "r" for e in ledger.events) == kept
    assert any(p.name.startswith("privacy-ledger.jsonl.damaged-") for p in state.iterdir()) == (how != "ledger_deleted")


def test_a_repair_from_a_backup_keeps_its_records_and_adds_only_what_is_missing(tmp_path):
    store, state = _store_dir(tmp_path, "S003"), tmp_path / "state"
    _three_rounds(state)
    backup = tmp_path / "backup.jsonl"
    backup.write_text("".join(ledger_path(state).read_text().splitlines(keepends=True)[:5]))  # 2 rounds
    ledger_path(state).unlink()
    done, _ = report.repair(store, state, confirm=lambda question: True, backup=backup)
    ledger = read_ledger(state, "S003")
    assert done and [e.run_id for e in ledger.events] == ["r", "r", "lost-spend"]
    assert ledger.events[-1].mechanism() == (MECH[0], MECH[1], 13)


def test_a_lost_head_is_refused_until_the_operator_accepts_the_ledger(tmp_path, capsys):
    store, state = _store_dir(tmp_path, "S003"), tmp_path / "state"
    _three_rounds(state)
    head_path(state).unlink()
    with pytest.raises(LedgerError, match="accept-ledger"):
        read_ledger(state, "S003")
    argv = ["privacy", "--store-dir", str(store), "--state-dir", str(state), "--accept-ledger", "--yes"]
    assert main(argv) == 0
    assert "is rebuilt from" in capsys.readouterr().out
    assert len(read_events(state, "S003")) == 3
    assert main(argv) == 2  # a head exists now: nothing to accept
    assert main(["privacy", "--store-dir", str(store), "--state-dir", str(state), "--repair", "--yes"]) == 2
    assert "nothing to repair" in capsys.readouterr().err


def test_the_ledger_one_write_ahead_of_its_head_reads_as_it_is(tmp_path):
    state = tmp_path / "state"
    _three_rounds(state)
    old_head = head_path(state).read_text()
    store_ledger.append_event(state, "S003", _event("r", 4))
    head_path(state).write_text(old_head)  # a crash between the ledger's write and the head's
    assert len(read_events(state, "S003")) == 4


def _v1_ledger(store_id, events):
    """A ledger as version 1 wrote it: ``prev`` is the SHA-256 of the line before."""
    from dataclasses import asdict

    lines = [json.dumps({"format": "storefed-privacy-ledger", "version": 1, "store_id": store_id}, sort_keys=True)]
    for seq, event in enumerate(events, start=1):
        prev = hashlib.sha256(lines[-1].encode()).hexdigest()
        lines.append(json.dumps({**asdict(event), "seq": seq, "prev": prev}, sort_keys=True))
    return "\n".join(lines) + "\n"


def test_an_old_ledger_reads_and_is_migrated_on_the_next_write(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    ledger_path(state).write_text(_v1_ledger("S1", [_event("old", 1), _event("old", 2)]))
    assert read_events(state, "S1") == [_event("old", 1), _event("old", 2)]  # no head needed
    store_ledger.append_event(state, "S1", _event("new", 1))
    text = ledger_path(state).read_text()
    assert json.loads(text.splitlines()[0])["version"] == 2 and head_path(state).exists()
    assert [e.run_id for e in read_events(state, "S1")] == ["old", "old", "new"]
    # An old-format ledger put back beside a head is an older copy: refused.
    ledger_path(state).write_text(_v1_ledger("S1", [_event("old", 1)]))
    with pytest.raises(LedgerError, match="older copy"):
        read_events(state, "S1")


# --- the v2 hash, recomputed from its documented definition ------------------------------------
# common/privacy/ledger.py: each record carries seq, prev_hash (the previous record's hash; for
# the first, the SHA-256 of the header line) and hash = SHA-256 of prev_hash, "\n" and the
# record's canonical JSON without "hash" (sorted keys, no spaces, ASCII). Written here again,
# by hand, so that a hash that skipped a field would not be checked against itself.

def _independent_hash(record: dict, prev_hash: str) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256((prev_hash + "\n" + canonical).encode("utf-8")).hexdigest()


def test_every_record_hash_is_the_documented_sha256_chain(tmp_path):
    state = tmp_path / "state"
    _three_rounds(state)
    lines = ledger_path(state).read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "storefed-privacy-ledger", "version": 2, "store_id": "S003"}
    prev = hashlib.sha256(lines[0].encode("utf-8")).hexdigest()
    for seq, line in enumerate(lines[1:], start=1):
        record = json.loads(line)
        assert record["seq"] == seq and record["prev_hash"] == prev
        assert record["hash"] == _independent_hash(record, prev)
        prev = record["hash"]
    head = json.loads(head_path(state).read_text())
    assert (head["seq"], head["hash"]) == (6, prev)  # 3 reservations + 3 events


FIELDS = {"noise_multiplier": 0.5, "sample_rate": 0.01, "delta": 1e-3, "steps": 2, "clip_norm": 9.0}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_altering_any_mechanism_field_changes_the_hash_and_is_refused(tmp_path, field):
    state = tmp_path / "state"
    _three_rounds(state)
    path = ledger_path(state)
    lines = path.read_text().splitlines()
    at = next(i for i, x in enumerate(lines) if '"type": "event"' in x)  # the first committed event
    record = json.loads(lines[at])
    assert record[field] != FIELDS[field]
    altered = {**record, field: FIELDS[field]}
    # By the definition, the field is part of what is hashed.
    assert _independent_hash(altered, record["prev_hash"]) != record["hash"]
    # The store refuses the edit as it is...
    path.write_text("\n".join(lines[:at] + [json.dumps(altered, sort_keys=True)] + lines[at + 1:]) + "\n")
    with pytest.raises(LedgerError, match=f"line {at + 1}: its hash does not match"):
        read_ledger(state, "S003")
    # ... and with the record's own hash recomputed: the next record no longer follows it.
    altered["hash"] = _independent_hash(altered, record["prev_hash"])
    path.write_text("\n".join(lines[:at] + [json.dumps(altered, sort_keys=True)] + lines[at + 1:]) + "\n")
    with pytest.raises(LedgerError, match=f"line {at + 2} does not follow"):
        read_ledger(state, "S003")


# --- a head that is corrupted, not deleted -------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "not_a_head", "seq_lowered", "hash_edited", "negative_steps"])
def test_a_corrupted_head_is_refused_naming_it_and_nothing_is_written(tmp_path, damage):
    state = tmp_path / "state"
    _three_rounds(state)
    hpath = head_path(state)
    head = json.loads(hpath.read_text())
    if damage == "garbage":
        hpath.write_bytes(b"\x00\xff{not json")
    elif damage == "not_a_head":
        hpath.write_text(json.dumps({**head, "format": "something-else"}))
    elif damage == "seq_lowered":  # the head claims the ledger ended earlier, at another record
        hpath.write_text(json.dumps({**head, "seq": 2}))
    elif damage == "hash_edited":
        hpath.write_text(json.dumps({**head, "hash": "0" * 64}))
    else:
        hpath.write_text(json.dumps({**head, "history": [[1.1, 0.08, -39]]}))
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    named = hpath if damage in ("garbage", "not_a_head", "negative_steps") else ledger_path(state)
    with pytest.raises(LedgerError, match=str(named)):
        read_ledger(state, "S003")
    with pytest.raises(LedgerError):
        store_ledger.reserve(state, "S003", _event("next", 4), _check(1000.0), _eps)
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before


def test_an_unreadable_head_can_be_rebuilt_by_the_operator_and_is_kept_for_inspection(tmp_path):
    store, state = _store_dir(tmp_path, "S003"), tmp_path / "state"
    _three_rounds(state)
    good_head = json.loads(head_path(state).read_text())
    head_path(state).write_text("{broken")
    argv = ["privacy", "--store-dir", str(store), "--state-dir", str(state), "--accept-ledger", "--yes"]
    assert main(argv) == 0
    rebuilt = json.loads(head_path(state).read_text())
    assert (rebuilt["seq"], rebuilt["hash"], rebuilt["history"]) == (good_head["seq"], good_head["hash"], good_head["history"])
    kept = [p for p in state.iterdir() if p.name.startswith("privacy-ledger.head.json.damaged-")]
    assert len(kept) == 1 and kept[0].read_text() == "{broken"
    assert len(read_events(state, "S003")) == 3
