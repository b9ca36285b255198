"""The privacy ledger file at a store: verify, reserve, commit, release, repair.

Every operation takes the store's file lock (fcntl), reads and verifies the whole ledger
against its head, and, if it writes, rewrites the ledger atomically (temp file, fsync,
rename, directory fsync) and then the head the same way. A crash leaves the old ledger or
the new one, never half of one; a crash between the two writes leaves the ledger one record
ahead of its head, which reads as it should (more spent, never less).

The budget check and the reservation are one step under the lock (:func:`reserve`), so two
runs at one store can never spend past its budget together.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from client.state.file_lock import locked
from common.data.storefiles import atomic_write_text
from common.privacy.ledger import (BudgetDecision, Head, Ledger, LedgerError, Mechanism, PrivacyEvent,
                                   Reservation, append, check_against_head, event_record, head_of, head_text,
                                   new_ledger, parse, parse_head, release_record, repaired, reservation_record,
                                   render)

LEDGER_FILE = "privacy-ledger.jsonl"
HEAD_FILE = "privacy-ledger.head.json"

EpsilonOf = Callable[[list[Mechanism]], float]
# (events' history, open reservations, the new round) → decision; see common.privacy.ledger.budget_decision
BudgetCheck = Callable[[list[Mechanism], list[Mechanism], Mechanism], BudgetDecision]


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


def head_path(state_dir: Path) -> Path:
    return Path(state_dir) / HEAD_FILE


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _locked(state_dir: Path):
    return locked(Path(state_dir) / f".{LEDGER_FILE}.lock")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot be read ({exc.__class__.__name__}); training stops until "
                          "it is restored") from None


def _read_head(state_dir: Path) -> Head | None:
    path = head_path(state_dir)
    return parse_head(_read_text(path), str(path)) if path.exists() else None


def _load(state_dir: Path, store_id: str) -> Ledger:
    """The verified ledger (a new empty one when the store never trained). Lock held."""
    path, hpath = ledger_path(state_dir), head_path(state_dir)
    head = _read_head(state_dir)
    if not path.exists():
        if head is not None:
            raise LedgerError(f"{path}: missing, but {hpath} records {head.seq} records of spending; the "
                              "store trains nothing until its operator restores the ledger from backup or "
                              "runs storefed privacy --repair (which keeps the recorded spend)")
        return new_ledger(store_id)
    ledger = parse(_read_text(path), str(path))
    if store_id and ledger.store_id != store_id:
        raise LedgerError(f"{path}: this ledger belongs to store '{ledger.store_id}', not '{store_id}'")
    if head is None:
        if ledger.version >= 2:
            # Refused rather than rebuilt: the head is the only witness of how long the ledger
            # was, and a head lost together with the ledger's tail looks exactly like this.
            raise LedgerError(f"{hpath}: missing while {path} exists, so nothing shows whether records "
                              "were lost; restore it from backup, or, once you know the ledger is "
                              "complete, run storefed privacy --accept-ledger")
    else:
        check_against_head(ledger, head, str(path), str(hpath))
    return ledger


def _write(state_dir: Path, ledger: Ledger, epsilon_of: EpsilonOf | None) -> None:
    """The ledger, then its head: both atomic. Lock held.

    A write that fails (a full disk, a read-only or vanished volume) is a LedgerError: the
    step it belongs to did not happen durably, so the store refuses (its reply says why) and,
    after training, nothing leaves. The atomic write left the previous file, which verifies."""
    counted = ledger.counted()
    epsilon = 0.0 if not counted else (float(epsilon_of(counted)) if epsilon_of else None)
    for path, text in ((ledger_path(state_dir), render(ledger)), (head_path(state_dir), None)):
        try:
            atomic_write_text(path, text if text is not None else head_text(head_of(ledger, epsilon, _now())))
        except OSError as exc:
            raise LedgerError(f"{path}: cannot be written ({exc.strerror or exc.__class__.__name__}); the "
                              "spend is not durable, so this store sends nothing until it can write its "
                              "ledger (free disk space, then train again)") from None


def read_ledger(state_dir: Path, store_id: str = "") -> Ledger:
    """The store's verified ledger: events and open reservations. Raises LedgerError."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        return _load(state_dir, store_id)


def read_events(state_dir: Path, store_id: str = "") -> list[PrivacyEvent]:
    """All committed events of the store's ledger (empty when there is no ledger yet)."""
    return list(read_ledger(state_dir, store_id).events)


def reserve(state_dir: Path, store_id: str, planned: PrivacyEvent, check: BudgetCheck,
            epsilon_of: EpsilonOf | None = None) -> tuple[BudgetDecision, Reservation | None]:
    """Check the budget and, if the round fits, reserve it — one step under the lock.

    ``check`` gets the events' history, the open reservations and ``planned``'s mechanism.
    Returns the decision and the reservation written (None on a decline: nothing written).
    """
    state_dir = Path(state_dir)
    with _locked(state_dir):
        ledger = _load(state_dir, store_id)
        decision = check(ledger.history(), ledger.reserved(), planned.mechanism())
        if not decision.fits:
            return decision, None
        reservation = Reservation(f"{secrets.token_hex(4)}", planned)
        _write(state_dir, append(ledger, reservation_record(reservation)), epsilon_of)
        return decision, reservation


def commit(state_dir: Path, store_id: str, reservation_id: str, event: PrivacyEvent,
           epsilon_of: EpsilonOf | None = None) -> Ledger:
    """Record ``event`` (the round as trained) in place of its reservation, durably.

    Recorded even when the reservation is no longer open (an operator cleared it while the
    round trained): the round was trained, so it is spent.
    """
    state_dir = Path(state_dir)
    with _locked(state_dir):
        ledger = append(_load(state_dir, store_id), event_record(event, reservation_id))
        _write(state_dir, ledger, epsilon_of)
        return ledger


def release(state_dir: Path, store_id: str, reservation_id: str, reason: str,
            epsilon_of: EpsilonOf | None = None) -> Reservation:
    """Give back an open reservation (nothing left the store for it). Raises LedgerError
    when no open reservation has that id."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        ledger = _load(state_dir, store_id)
        found = ledger.find(reservation_id)
        if found is None:
            open_ids = ", ".join(r.id for r in ledger.open) or "none"
            raise LedgerError(f"{ledger_path(state_dir)}: no open reservation '{reservation_id}' "
                              f"(open: {open_ids})")
        _write(state_dir, append(ledger, release_record(reservation_id, reason, _now())), epsilon_of)
        return found


def append_event(state_dir: Path, store_id: str, event: PrivacyEvent) -> list[PrivacyEvent]:
    """Durably add ``event`` without a reservation; returns every event including it."""
    return list(commit(state_dir, store_id, "", event).events)


# --- the operator's repairs (storefed privacy) --------------------------------------------

@dataclass(frozen=True)
class RepairPlan:
    """What a repair would write, for the operator to confirm."""

    source: Path  # the ledger text salvaged (the damaged ledger or a backup)
    kept: int  # records of ``source`` that verify and are kept
    lost: list[Mechanism]  # lost-spend events to add: what the head counted beyond ``kept``
    ledger: Ledger
    head: Head


def plan_repair(state_dir: Path, store_id: str, backup: Path | None = None) -> RepairPlan:
    """A repair of a ledger that is cut short, altered or missing, keeping the head's spend.

    Keeps the records of the ledger (or of ``backup``) that verify, up to the first one that
    does not, and adds lost-spend events for whatever the head counted beyond them. Needs
    the head: without it nothing says what was spent.
    """
    state_dir = Path(state_dir)
    head = _read_head(state_dir)
    if head is None:
        raise LedgerError(f"{head_path(state_dir)}: missing, so nothing records what was spent; restore "
                          "the ledger or the head from backup (or, if the ledger is complete, "
                          "storefed privacy --accept-ledger)")
    source = Path(backup) if backup else ledger_path(state_dir)
    if backup is None:
        try:
            with _locked(state_dir):
                _load(state_dir, store_id)
        except LedgerError:
            pass
        else:
            raise LedgerError(f"{ledger_path(state_dir)}: verifies against {head_path(state_dir)}; "
                              "nothing to repair")
    if source.exists():
        salvaged = parse(_read_text(source), str(source), salvage=True)
        if salvaged.store_id != head.store_id:
            raise LedgerError(f"{source}: belongs to store '{salvaged.store_id}', not '{head.store_id}'")
    elif backup:
        raise LedgerError(f"{source}: backup not found")
    else:
        salvaged = new_ledger(head.store_id)
    if store_id and head.store_id != store_id:
        raise LedgerError(f"{head_path(state_dir)}: belongs to store '{head.store_id}', not '{store_id}'")
    fixed, lost = repaired(salvaged, head, _now())
    return RepairPlan(source, salvaged.seq, lost, fixed, head)


def apply_repair(state_dir: Path, plan: RepairPlan, epsilon_of: EpsilonOf | None = None) -> Path | None:
    """Write the repaired ledger and head; the damaged ledger is kept beside it for
    inspection. Returns where the damaged ledger was moved (None when there was none)."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        head = _read_head(state_dir)
        if head is None or (head.seq, head.hash) != (plan.head.seq, plan.head.hash):
            raise LedgerError(f"{head_path(state_dir)}: changed since the repair was planned; run it again")
        kept = None
        path = ledger_path(state_dir)
        if path.exists():
            kept = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
            atomic_write_text(kept, _read_text(path))
        _write(state_dir, plan.ledger, epsilon_of)
        _load(state_dir, plan.ledger.store_id)  # the result must verify
        return kept


def accept_ledger(state_dir: Path, store_id: str, epsilon_of: EpsilonOf | None = None) -> Ledger:
    """Rebuild a missing or unreadable head from a ledger whose own hash chain verifies: the
    operator vouches that no records were lost. Refused when a readable head exists."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        hpath = head_path(state_dir)
        if hpath.exists():
            try:
                _read_head(state_dir)
            except LedgerError:  # an unreadable head is as good as none; kept for inspection
                atomic_write_text(hpath.with_name(f"{hpath.name}.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"),
                                  hpath.read_text(encoding="utf-8", errors="replace"))
            else:
                raise LedgerError(f"{hpath}: exists; --accept-ledger only rebuilds a missing or unreadable "
                                  "head (for a damaged ledger use --repair)")
        path = ledger_path(state_dir)
        if not path.exists():
            raise LedgerError(f"{path}: missing; nothing to accept")
        ledger = parse(_read_text(path), str(path))
        if store_id and ledger.store_id != store_id:
            raise LedgerError(f"{path}: this ledger belongs to store '{ledger.store_id}', not '{store_id}'")
        _write(state_dir, ledger, epsilon_of)
        return ledger
