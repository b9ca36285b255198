"""common.privacy.ledger (the pure content of the ledger): every hash recomputed here with
hashlib and json, every refusal named exactly, the head and the repair arithmetic by hand.
Kills the mutants that tests/test_ledger.py (files, locks, the ClientApp) leaves alive."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import pytest

from common.privacy import ledger as L
from common.privacy.ledger import Head, LedgerError, PrivacyEvent, Reservation

AT = "2026-01-01T00:00:00+00:00"


def _event(run_id="r", rnd=1, sigma=1.1, q=0.08, steps=13, delta=1e-6, accountant="prv", clip=1.0):
    return PrivacyEvent(run_id=run_id, round=rnd, noise_multiplier=sigma, sample_rate=q, steps=steps,
                        clip_norm=clip, accountant=accountant, at=AT, delta=delta)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _independent_hash(record: dict, prev: str) -> str:
    """The v2 record hash as DESIGN §4.2 states it, written out here without the module."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return _sha(prev + "\n" + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True))


def _header(store="S1", version=2):
    return json.dumps({"format": "storefed-privacy-ledger", "version": version, "store_id": store}, sort_keys=True)


def test_the_header_and_an_empty_ledger():
    assert L.header_line("S1") == '{"format": "storefed-privacy-ledger", "store_id": "S1", "version": 2}'
    assert L.header_line("S1", 1) == _header("S1", 1)
    empty = L.new_ledger("S9")
    assert empty.store_id == "S9" and empty.version == 2 and empty.lines == (_header("S9"),)
    assert empty.hashes == (_sha(_header("S9")),) and empty.seq == 0 and empty.last_hash == _sha(_header("S9"))
    assert L.render(empty) == _header("S9") + "\n"
    assert empty.latest is None and empty.events == () and empty.open == ()


def test_record_hash_covers_every_field_but_hash_itself():
    record = {"type": "event", "steps": 13, "noise_multiplier": 1.1, "name": "é", "hash": "whatever"}
    assert L.record_hash(record, "p" * 64) == _independent_hash(record, "p" * 64)
    assert L.record_hash({**record, "hash": "other"}, "p" * 64) == L.record_hash(record, "p" * 64)
    # σ, q, δ and the previous hash each change it
    for key, value in (("noise_multiplier", 1.2), ("sample_rate", 0.1), ("delta", 1e-7), ("steps", 12)):
        assert L.record_hash({**record, key: value}, "p" * 64) != L.record_hash(record, "p" * 64)
    assert L.record_hash(record, "q" * 64) != L.record_hash(record, "p" * 64)
    with pytest.raises(ValueError):
        L.record_hash({"x": math.nan}, "p")


def test_appended_records_chain_with_independently_recomputed_hashes():
    ledger = L.new_ledger("S1")
    r = Reservation("res-1", _event(rnd=1))
    ledger = L.append(ledger, L.reservation_record(r))
    ledger = L.append(ledger, L.event_record(_event(rnd=1), reservation="res-1"))
    ledger = L.append(ledger, L.release_record("res-x", "gave up", AT))
    text = L.render(ledger)
    lines = text.split("\n")
    assert lines[-1] == "" and lines[0] == _header("S1")
    prev = _sha(lines[0])
    for seq, line in enumerate(lines[1:-1], start=1):
        record = json.loads(line)
        assert line == json.dumps(record, sort_keys=True)
        assert record["seq"] == seq and record["prev_hash"] == prev
        assert record["hash"] == _independent_hash(record, prev)
        prev = record["hash"]
    assert ledger.seq == 3 and ledger.last_hash == prev and len(ledger.hashes) == 4
    first = json.loads(lines[1])
    assert first == {"type": "reservation", "id": "res-1", **asdict(_event(rnd=1)), "seq": 1,
                     "prev_hash": _sha(lines[0]), "hash": first["hash"]}
    second = json.loads(lines[2])
    assert {k: second[k] for k in ("type", "reservation", "steps")} == {"type": "event", "reservation": "res-1",
                                                                       "steps": 13}
    third = json.loads(lines[3])
    assert {k: third[k] for k in ("type", "reservation", "reason", "at")} == {
        "type": "release", "reservation": "res-x", "reason": "gave up", "at": AT}
    # the same text parses back to the same ledger
    again = L.parse(text, "f")
    assert again == ledger
    assert again.events == (_event(rnd=1),) and again.open == () and again.latest == _event(rnd=1)


def test_record_builders_by_hand():
    e = _event()
    assert L.event_record(e) == {"type": "event", **asdict(e), "reservation": ""}
    assert L.event_record(e, "x") == {"type": "event", **asdict(e), "reservation": "x"}
    assert L.reservation_record(Reservation("i", e)) == {"type": "reservation", "id": "i", **asdict(e)}
    assert L.release_record("i", "why", AT) == {"type": "release", "reservation": "i", "reason": "why", "at": AT}


def test_reservations_open_and_close_and_count_as_spent():
    a, b = _event(rnd=1, steps=5), _event(rnd=2, steps=7, sigma=2.0)
    ledger = L.new_ledger("S1")
    ledger = L.append(ledger, L.reservation_record(Reservation("A", a)))
    ledger = L.append(ledger, L.reservation_record(Reservation("B", b)))
    assert [r.id for r in ledger.open] == ["A", "B"] and ledger.find("B") == Reservation("B", b)
    assert ledger.find("C") is None
    assert ledger.latest == b
    assert ledger.counted() == [a.mechanism(), b.mechanism()] and ledger.history() == []
    assert ledger.reserved() == [(1.1, 0.08, 5), (2.0, 0.08, 7)]
    ledger = L.append(ledger, L.event_record(a, "A"))  # A commits
    assert [r.id for r in ledger.open] == ["B"] and ledger.history() == [(1.1, 0.08, 5)]
    assert ledger.counted() == [(1.1, 0.08, 5), (2.0, 0.08, 7)]
    ledger = L.append(ledger, L.release_record("B", "failed", AT))
    assert ledger.open == () and ledger.counted() == [(1.1, 0.08, 5)]
    ledger = L.append(ledger, L.event_record(b))  # an event without reservation closes nothing
    assert ledger.history() == [(1.1, 0.08, 5), (2.0, 0.08, 7)]
    assert L.parse(L.render(ledger), "x") == ledger


def _lines(ledger):
    return L.render(ledger).split("\n")[:-1]


def _three():
    ledger = L.new_ledger("S1")
    for rnd in (1, 2, 3):
        ledger = L.append(ledger, L.event_record(_event(rnd=rnd)))
    return ledger


def _text(lines):
    return "\n".join(lines) + "\n"


def test_parse_refuses_each_kind_of_damage_with_its_message():
    lines = _lines(_three())
    with pytest.raises(LedgerError) as err:
        L.parse(_text(lines)[:-1], "F")
    assert str(err.value) == ("F: the last line is incomplete (a write was cut off); restore the ledger from "
                              "backup or repair it (storefed privacy --repair)")
    for bad in ("", "not json\n", '["a"]\n', '{"format": "other"}\n'):
        with pytest.raises(LedgerError) as err:
            L.parse(bad, "F")
        assert str(err.value) == "F: not a storefed privacy ledger (line 1 is not its header)"
    with pytest.raises(LedgerError) as err:
        L.parse(_text([_header("S1", 3)]), "F")
    assert str(err.value) == "F: ledger version 3 is not supported"
    with pytest.raises(LedgerError) as err:
        L.parse(_text([lines[0], "{oops", *lines[2:]]), "F")
    assert str(err.value) == "F: line 2 is not valid JSON; the ledger was altered or damaged"
    with pytest.raises(LedgerError) as err:
        L.parse(_text([lines[0], lines[2]]), "F")  # record 1 lost
    assert str(err.value) == ("F: line 2 does not follow the record before it (lines edited, reordered or "
                              "lost); the ledger was altered")
    edited = json.loads(lines[3])
    edited["steps"] = 1
    with pytest.raises(LedgerError) as err:
        L.parse(_text([*lines[:3], json.dumps(edited, sort_keys=True)]), "F")
    assert str(err.value) == "F: line 4: its hash does not match its content; the ledger was altered"
    nan = lines[3].replace('"noise_multiplier": 1.1', '"noise_multiplier": NaN')
    with pytest.raises(LedgerError) as err:
        L.parse(_text([*lines[:3], nan]), "F")
    assert str(err.value) == "F: line 4 holds a non-finite number; the ledger was altered"
    with pytest.raises(LedgerError) as err:
        L.parse(_text([lines[0], '"a string"']), "F")
    assert "line 2 does not follow" in str(err.value)


def test_an_unknown_record_type_is_refused_even_with_a_valid_hash():
    ledger = L.new_ledger("S1")
    with pytest.raises(LedgerError) as err:
        L.append(ledger, {"type": "gift", "steps": 0})
    assert str(err.value) == "new record 1 has an unknown record type 'gift'; the ledger was altered"
    record = {"type": None, "seq": 1, "prev_hash": ledger.last_hash}
    record["hash"] = _independent_hash(record, ledger.last_hash)
    with pytest.raises(LedgerError) as err:
        L.parse(_text([_header("S1"), json.dumps(record)]), "F")
    assert str(err.value) == "F: line 2 has an unknown record type None; the ledger was altered"


def test_salvage_keeps_the_intact_prefix_only():
    lines = _lines(_three())
    edited = json.loads(lines[2])
    edited["steps"] = 1
    damaged = _text([lines[0], lines[1], json.dumps(edited, sort_keys=True), lines[3]])
    kept = L.parse(damaged, "F", salvage=True)
    assert kept.seq == 1 and kept.history() == [(1.1, 0.08, 13)] and kept.lines == tuple(lines[:2])
    cut = _text(lines)[:-10]  # the last line cut off mid-write
    kept = L.parse(cut, "F", salvage=True)
    assert kept.seq == 2 and len(kept.events) == 2


@pytest.mark.parametrize("field,value", [("steps", -1), ("noise_multiplier", -0.5), ("sample_rate", 1.5),
                                         ("sample_rate", -0.1), ("delta", 0.0), ("delta", 1.0),
                                         ("noise_multiplier", math.inf)])
def test_an_impossible_mechanism_is_refused(field, value):
    body = L.event_record(_event())
    body[field] = value
    with pytest.raises(LedgerError) as err:
        L._event_of(body, "W")
    assert str(err.value) == "W holds impossible values"


def test_the_edges_of_a_possible_mechanism_read():
    for field, value in (("steps", 0), ("noise_multiplier", 0.0), ("sample_rate", 0.0), ("sample_rate", 1.0),
                         ("delta", 0.999)):
        body = L.event_record(_event())
        body[field] = value
        assert getattr(L._event_of(body, "W"), field) == value
    body = {**L.event_record(_event()), "steps": "7", "round": "2", "sample_rate": "0.5"}
    e = L._event_of(body, "W")
    assert (e.steps, e.round, e.sample_rate) == (7, 2, 0.5)
    for missing in ("run_id", "delta", "at"):
        body = L.event_record(_event())
        del body[missing]
        with pytest.raises(LedgerError) as err:
            L._event_of(body, "W")
        assert str(err.value) == ("W lacks a field of run_id, round, noise_multiplier, sample_rate, steps, "
                                  "clip_norm, accountant, at, delta")
    with pytest.raises(LedgerError):
        L._event_of({**L.event_record(_event()), "steps": "many"}, "W")


def _v1(store, events):
    lines = [_header(store, 1)]
    for seq, event in enumerate(events, start=1):
        lines.append(json.dumps({**asdict(event), "seq": seq, "prev": _sha(lines[-1])}, sort_keys=True))
    return lines


def test_a_version_1_ledger_reads_and_migrates():
    lines = _v1("S2", [_event(rnd=1), _event(rnd=2, steps=4)])
    old = L.parse(_text(lines), "F")
    assert old.version == 1 and old.lines is None and old.store_id == "S2"
    assert old.events == (_event(rnd=1), _event(rnd=2, steps=4)) and old.latest == _event(rnd=2, steps=4)
    assert old.hashes == tuple(_sha(x) for x in lines) and old.seq == 2
    new = L.migrated(old)
    assert new.version == 2 and new.events == old.events and new.seq == 2
    assert _lines(new)[0] == _header("S2")
    assert L.render(old) == L.render(new)
    assert L.migrated(new) is new
    appended = L.append(old, L.event_record(_event(rnd=3)))
    assert appended.version == 2 and len(appended.events) == 3
    assert L.parse(_text(_v1("S2", [])), "F").latest is None


def test_a_damaged_version_1_ledger_is_refused_or_salvaged():
    lines = _v1("S2", [_event(rnd=1), _event(rnd=2), _event(rnd=3)])
    with pytest.raises(LedgerError) as err:
        L.parse(_text([lines[0], lines[1], lines[3]]), "F")
    assert str(err.value) == ("F: line 3 does not follow line 2 (edited, reordered or lines lost); "
                              "the ledger is corrupted")
    with pytest.raises(LedgerError) as err:
        L.parse(_text([lines[0], "{x"]), "F")
    assert str(err.value) == "F: line 2 is not valid JSON; the ledger is corrupted"
    bad_seq = json.loads(lines[1])
    bad_seq["seq"] = 2
    with pytest.raises(LedgerError):
        L.parse(_text([lines[0], json.dumps(bad_seq)]), "F")
    kept = L.parse(_text([lines[0], lines[1], lines[3]]), "F", salvage=True)
    assert len(kept.events) == 1 and kept.hashes == (_sha(lines[0]), _sha(lines[1]))
    bad_value = json.loads(lines[2])
    bad_value["steps"] = -3
    kept = L.parse(_text([lines[0], lines[1], json.dumps(bad_value, sort_keys=True)]), "F", salvage=True)
    assert len(kept.events) == 1


def test_the_head_of_a_ledger_and_its_text_round_trip():
    ledger = _three()
    ledger = L.append(ledger, L.reservation_record(Reservation("R", _event(rnd=4, sigma=2.0, steps=5,
                                                                              delta=1e-7, accountant="rdp"))))
    head = L.head_of(ledger, 3.25, "now")
    assert head == Head("S1", 4, ledger.last_hash, ((1.1, 0.08, 39), (2.0, 0.08, 5)), 1e-7, "rdp", 3.25, "now")
    assert L.head_of(ledger, math.inf, "now").epsilon is None
    assert L.head_of(ledger, None, "now").epsilon is None
    empty = L.head_of(L.new_ledger("S0"), 0.0, "t")
    assert (empty.seq, empty.history, empty.delta, empty.accountant, empty.epsilon) == (0, (), 0.0, "prv", 0.0)
    text = L.head_text(head)
    assert text.endswith("}\n")
    body = json.loads(text)
    assert body == {"format": "storefed-privacy-ledger-head", "store_id": "S1", "seq": 4, "hash": ledger.last_hash,
                    "history": [[1.1, 0.08, 39], [2.0, 0.08, 5]], "delta": 1e-7, "accountant": "rdp",
                    "epsilon": 3.25, "at": "now"}
    assert text == json.dumps(body, sort_keys=True) + "\n"
    assert L.parse_head(text, "H") == head
    assert L.parse_head(L.head_text(L.head_of(ledger, None, "now")), "H").epsilon is None


@pytest.mark.parametrize("damage", ["not json", "[]", '{"format": "x"}', "missing", "history"])
def test_a_damaged_head_is_refused(damage):
    body = json.loads(L.head_text(L.head_of(_three(), 1.0, "t")))
    text = {"not json": "{", "[]": "[]", '{"format": "x"}': json.dumps({**body, "format": "x"}),
            "missing": json.dumps({k: v for k, v in body.items() if k != "seq"}),
            "history": json.dumps({**body, "history": [[1.0, 0.1]]})}[damage]
    with pytest.raises(LedgerError) as err:
        L.parse_head(text, "H")
    assert str(err.value) == ("H: not a storefed ledger head (damaged or edited); restore it from backup, or if "
                              "the ledger is complete: storefed privacy --accept-ledger")


@pytest.mark.parametrize("change", [{"seq": -1}, {"history": [[-1.0, 0.1, 3]]}, {"history": [[1.0, 1.5, 3]]},
                                    {"history": [[1.0, -0.1, 3]]}, {"history": [[1.0, 0.1, -3]]},
                                    {"history": [[float("inf"), 0.1, 3]]}, {"history": [[float("nan"), 0.1, 3]]}])
def test_a_head_with_impossible_values_is_refused(change):
    body = {**json.loads(L.head_text(L.head_of(_three(), 1.0, "t"))), **change}
    with pytest.raises(LedgerError) as err:
        L.parse_head(json.dumps(body), "H")
    assert str(err.value) == "H: holds impossible values (damaged or edited)"


def test_a_head_at_the_edges_reads():
    body = {**json.loads(L.head_text(L.head_of(_three(), 1.0, "t"))), "seq": 0,
            "history": [[0.0, 0.0, 0], [1.0, 1.0, 2]]}
    assert L.parse_head(json.dumps(body), "H").history == ((0.0, 0.0, 0), (1.0, 1.0, 2))


def test_check_against_head_accepts_equal_or_one_ahead_and_names_each_problem():
    ledger = _three()
    head = L.head_of(ledger, 1.5, "t")
    L.check_against_head(ledger, head, "LF", "HF")
    L.check_against_head(L.append(ledger, L.event_record(_event(rnd=4))), head, "LF", "HF")
    repair = ("; the store trains nothing until its operator acts: restore the ledger from backup, or run "
              "storefed privacy --repair (which keeps the recorded spend)")
    with pytest.raises(LedgerError) as err:
        L.check_against_head(L.new_ledger("S2"), head, "LF", "HF")
    assert str(err.value) == f"LF: belongs to store 'S2' but HF to 'S1'{repair}"
    short = L.parse(_text(_lines(ledger)[:3]), "x")
    with pytest.raises(LedgerError) as err:
        L.check_against_head(short, head, "LF", "HF")
    assert str(err.value) == f"LF: cut short — it ends at record 2, but HF records 3 (ε 1.500 recorded){repair}"
    with pytest.raises(LedgerError) as err:
        L.check_against_head(short, L.head_of(ledger, None, "t"), "LF", "HF")
    assert str(err.value) == f"LF: cut short — it ends at record 2, but HF records 3{repair}"
    other = L.new_ledger("S1")
    for rnd in (1, 2, 3):
        other = L.append(other, L.event_record(_event(rnd=rnd, steps=1)))
    with pytest.raises(LedgerError) as err:
        L.check_against_head(other, head, "LF", "HF")
    assert str(err.value) == f"LF: record 3 does not match HF (the ledger was altered or replaced){repair}"
    old = L.parse(_text(_v1("S1", [_event(rnd=r) for r in (1, 2, 3)])), "x")
    with pytest.raises(LedgerError) as err:
        L.check_against_head(old, head, "LF", "HF")
    assert str(err.value) == (f"LF: an old-format ledger next to HF, which only a newer ledger writes: the "
                              f"ledger was replaced by an older copy{repair}")


def test_budget_decision_by_hand_with_a_counting_epsilon():
    seen = []

    def eps(history):  # ε = total steps / 10, and what it was asked
        seen.append(list(history))
        return sum(t for _, _, t in history) / 10

    fits = L.budget_decision([(1.0, 0.1, 10)], [(1.0, 0.1, 5)], (1.0, 0.1, 5), 2.0, eps)
    assert fits == L.BudgetDecision(True, 2.0, None)  # exactly at the budget fits
    assert seen == [[(1.0, 0.1, 10), (1.0, 0.1, 5), (1.0, 0.1, 5)]]
    seen.clear()
    declined = L.budget_decision([(1.0, 0.1, 10)], [(1.0, 0.1, 5)], (1.0, 0.1, 6), 2.0, eps)
    assert declined == L.BudgetDecision(False, 2.1, 1.5)
    assert seen[1] == [(1.0, 0.1, 10), (1.0, 0.1, 5)]


def test_lost_spend_and_a_repair_by_hand():
    head = Head("S1", 9, "h", ((1.0, 0.1, 30), (2.0, 0.1, 4), (3.0, 0.2, 2)), 1e-7, "rdp", None, "t")
    surviving = [(1.0, 0.1, 10), (1.0, 0.1, 5), (2.0, 0.1, 4), (5.0, 0.5, 1)]
    assert L.lost_spend(head, surviving) == [(1.0, 0.1, 15), (3.0, 0.2, 2)]
    assert L.lost_spend(head, [(1.0, 0.1, 40), (2.0, 0.1, 4), (3.0, 0.2, 2)]) == []
    salvaged = L.new_ledger("S1")
    salvaged = L.append(salvaged, L.event_record(_event(sigma=1.0, q=0.1, steps=10)))
    salvaged = L.append(salvaged, L.reservation_record(Reservation("open", _event(sigma=2.0, q=0.1, steps=4))))
    fixed, lost = L.repaired(salvaged, head, "fix-time")
    assert lost == [(1.0, 0.1, 20), (2.0, 0.1, 4), (3.0, 0.2, 2)]
    assert fixed.open == ()
    release = json.loads(_lines(fixed)[3])
    assert {k: release[k] for k in ("type", "reservation", "reason", "at")} == {
        "type": "release", "reservation": "open", "reason": "repair: counted in the lost-spend events", "at": "fix-time"}
    placeholders = fixed.events[1:]
    assert [e.mechanism() for e in placeholders] == lost
    assert all((e.run_id, e.round, e.clip_norm, e.accountant, e.at, e.delta) ==
               ("lost-spend", 0, 0.0, "rdp", "fix-time", 1e-7) for e in placeholders)
    assert L.merged(fixed.history()) == head.history
    assert L.parse(L.render(fixed), "x") == fixed


def test_merged_is_a_tuple_in_first_seen_order():
    assert L.merged([(2.0, 0.1, 1), (1.0, 0.1, 2), (2.0, 0.1, 3)]) == ((2.0, 0.1, 4), (1.0, 0.1, 2))


def test_a_header_without_a_store_id_reads_as_the_empty_id():
    text = json.dumps({"format": "storefed-privacy-ledger", "version": 2}) + "\n"
    assert L.parse(text, "F").store_id == ""
    v1 = json.dumps({"format": "storefed-privacy-ledger", "version": 1}) + "\n"
    assert L.parse(v1, "F").store_id == ""
