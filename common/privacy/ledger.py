"""The privacy ledger's content (DESIGN §4.2): records, their hash chain, the head, the
budget check, and the arithmetic of a repair. Pure: no files (those are client.state.ledger).

A ledger is a JSON-lines text: a header line, then one record per line. A record is

* ``event``: one DP-SGD mechanism run at the store (a trained round), or a ``lost-spend``
  placeholder written by a repair;
* ``reservation``: a round about to train, counted as spent until its run commits it (the
  event names the reservation) or releases it (``release``);
* ``release``: a reservation given back, by its run (training failed) or by the operator.

Every record carries ``seq`` (1, 2, …), ``prev_hash`` (the hash of the record before; the
header's digest for the first) and ``hash`` = SHA-256 of ``prev_hash`` and the record's
canonical JSON. The store keeps the last ``seq`` and ``hash`` in a separate *head*, with the
mechanisms it counted, so a ledger that is cut short, altered or deleted is detected and
can be repaired without ever reading as less spent than was recorded.

Version 1 ledgers (``seq`` and ``prev`` = digest of the previous line, no head) still read;
the next write rewrites them as version 2.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Sequence

from common.privacy.accountant import Mechanism, merge_history

FORMAT = "storefed-privacy-ledger"
HEAD_FORMAT = "storefed-privacy-ledger-head"
VERSION = 2
LOST_SPEND_RUN = "lost-spend"


class LedgerError(Exception):
    """A ledger that cannot be trusted; training must stop until an operator looks."""


@dataclass(frozen=True)
class PrivacyEvent:
    """One DP-SGD mechanism run at the store: ``steps`` steps at (σ, q, C)."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    accountant: str
    at: str  # ISO-8601 UTC time the event was recorded
    delta: float  # the δ the store accounts at (set by its size); ε is reported at the latest

    def mechanism(self) -> Mechanism:
        """The Opacus-accountant history entry ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Reservation:
    """An open reservation: the round ``planned`` will be, counted as spent until closed."""

    id: str
    planned: PrivacyEvent


@dataclass(frozen=True)
class Ledger:
    """A ledger read and verified: what it counts, and its lines for the next write.

    ``hashes[k]`` is the hash of record ``k`` (``hashes[0]`` the header's digest), so
    ``seq == len(hashes) - 1``. ``lines`` is None for a version-1 ledger (rewritten on the
    next write).
    """

    store_id: str
    version: int
    events: tuple[PrivacyEvent, ...] = ()
    open: tuple[Reservation, ...] = ()
    lines: tuple[str, ...] | None = None
    hashes: tuple[str, ...] = ()
    latest: PrivacyEvent | None = None  # the last event or reservation written (its δ counts)

    @property
    def seq(self) -> int:
        return len(self.hashes) - 1

    @property
    def last_hash(self) -> str:
        return self.hashes[-1]

    def history(self) -> list[Mechanism]:
        """Mechanisms of the committed events (lost-spend placeholders included)."""
        return [e.mechanism() for e in self.events]

    def reserved(self) -> list[Mechanism]:
        """Mechanisms of the open reservations."""
        return [r.planned.mechanism() for r in self.open]

    def counted(self) -> list[Mechanism]:
        """Everything the store counts as spent: events, then open reservations."""
        return self.history() + self.reserved()

    def find(self, reservation_id: str) -> Reservation | None:
        return next((r for r in self.open if r.id == reservation_id), None)


@dataclass(frozen=True)
class Head:
    """What the store keeps apart from its ledger: where the ledger ended and what it counted."""

    store_id: str
    seq: int
    hash: str
    history: tuple[Mechanism, ...]  # merged (σ, q) → steps of everything counted
    delta: float
    accountant: str
    epsilon: float | None  # ε of ``history`` at ``delta`` when the writer computed it
    at: str


# --- hashing -----------------------------------------------------------------------------

def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_hash(body: dict, prev_hash: str) -> str:
    """SHA-256 over the previous hash and the record's canonical JSON (without ``hash``)."""
    return _digest(prev_hash + "\n" + _canonical({k: v for k, v in body.items() if k != "hash"}))


def header_line(store_id: str, version: int = VERSION) -> str:
    return json.dumps({"format": FORMAT, "version": version, "store_id": store_id}, sort_keys=True)


def new_ledger(store_id: str) -> Ledger:
    header = header_line(store_id)
    return Ledger(store_id, VERSION, lines=(header,), hashes=(_digest(header),))


# --- reading -----------------------------------------------------------------------------

_FIELDS = {
    "run_id": str, "round": int, "noise_multiplier": float, "sample_rate": float, "steps": int,
    "clip_norm": float, "accountant": str, "at": str, "delta": float,
}


def _event_of(record: dict, where: str) -> PrivacyEvent:
    try:
        values = {k: kind(record[k]) for k, kind in _FIELDS.items()}
    except (KeyError, TypeError, ValueError):
        raise LedgerError(f"{where} lacks a field of {', '.join(_FIELDS)}") from None
    sigma, q = values["noise_multiplier"], values["sample_rate"]
    # Written so that NaN fails: a NaN σ or q must not read as a cheap mechanism.
    if not (values["steps"] >= 0 and sigma >= 0 and 0 <= q <= 1 and math.isfinite(sigma)
            and 0 < values["delta"] < 1):
        raise LedgerError(f"{where} holds impossible values")
    return PrivacyEvent(**values)


def parse(text: str, source: str, *, salvage: bool = False) -> Ledger:
    """The verified :class:`Ledger` of a ledger text; :class:`LedgerError` naming ``source``.

    With ``salvage``, reading stops quietly at the first record that does not verify and
    returns the intact prefix (used by a repair; never to decide what may be trained).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif not salvage:
        raise LedgerError(f"{source}: the last line is incomplete (a write was cut off); "
                          "restore the ledger from backup or repair it (storefed privacy --repair)")
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LedgerError(f"{source}: not a storefed privacy ledger (line 1 is not its header)")
    store_id = str(header.get("store_id", ""))
    if header.get("version") == 1:
        return _parse_v1(lines, store_id, source, salvage)
    if header.get("version") != VERSION:
        raise LedgerError(f"{source}: ledger version {header.get('version')} is not supported")
    built = _Builder(Ledger(store_id, VERSION, lines=(lines[0],), hashes=(_digest(lines[0]),)))
    for i, line in enumerate(lines[1:], start=2):
        try:
            built.add(_verified(line, built.seq, built.hashes[-1], f"{source}: line {i}"), line, f"{source}: line {i}")
        except LedgerError:
            if salvage:
                break
            raise
    return built.build()


def _verified(line: str, seq: int, last_hash: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise LedgerError(f"{where} is not valid JSON; the ledger was altered or damaged") from None
    if not isinstance(record, dict) or record.get("seq") != seq + 1 or record.get("prev_hash") != last_hash:
        raise LedgerError(f"{where} does not follow the record before it (lines edited, reordered "
                          "or lost); the ledger was altered")
    try:
        expected = record_hash(record, last_hash)
    except ValueError:  # NaN or infinity in a field: canonical JSON refuses them
        raise LedgerError(f"{where} holds a non-finite number; the ledger was altered") from None
    if record.get("hash") != expected:
        raise LedgerError(f"{where}: its hash does not match its content; the ledger was altered")
    return record


class _Builder:
    """Records taken into account one by one (lists, so that reading n records is O(n))."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.events, self.open = list(ledger.events), list(ledger.open)
        self.lines, self.hashes = list(ledger.lines or ()), list(ledger.hashes)
        self.latest = ledger.latest

    @property
    def seq(self) -> int:
        return len(self.hashes) - 1

    def add(self, record: dict, line: str, where: str) -> None:
        """Take the verified ``record`` (its text ``line``) into account."""
        kind = record.get("type")
        if kind == "event":
            self.latest = _event_of(record, where)
            self.events.append(self.latest)
            rid = str(record.get("reservation", ""))
            if rid:
                self.open = [r for r in self.open if r.id != rid]
        elif kind == "reservation":
            self.latest = _event_of(record, where)
            self.open.append(Reservation(str(record.get("id", "")), self.latest))
        elif kind == "release":
            self.open = [r for r in self.open if r.id != str(record.get("reservation", ""))]
        else:
            raise LedgerError(f"{where} has an unknown record type {kind!r}; the ledger was altered")
        self.lines.append(line)
        self.hashes.append(record["hash"])

    def build(self) -> Ledger:
        return replace(self.ledger, events=tuple(self.events), open=tuple(self.open), latest=self.latest,
                       lines=tuple(self.lines), hashes=tuple(self.hashes))


def _parse_v1(lines: list[str], store_id: str, source: str, salvage: bool) -> Ledger:
    """A version-1 ledger: each line's ``prev`` is the digest of the line before."""
    events = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise LedgerError(f"{source}: line {i} is not valid JSON; the ledger is corrupted") from None
            if not isinstance(record, dict) or record.get("seq") != i - 1 \
                    or record.get("prev") != _digest(lines[i - 2]):
                raise LedgerError(f"{source}: line {i} does not follow line {i - 1} (edited, reordered "
                                  "or lines lost); the ledger is corrupted")
            events.append(_event_of(record, f"{source}: line {i}"))
        except LedgerError:
            if salvage:
                break
            raise
    # Hashes by position only, so that ``seq`` counts the events; the first write migrates.
    return Ledger(store_id, 1, events=tuple(events), lines=None,
                  hashes=tuple(_digest(x) for x in lines[: len(events) + 1]),
                  latest=events[-1] if events else None)


# --- writing -----------------------------------------------------------------------------

def migrated(ledger: Ledger) -> Ledger:
    """A version-1 ledger's events as a version-2 ledger (identity for version 2)."""
    if ledger.version == VERSION:
        return ledger
    out = new_ledger(ledger.store_id)
    for event in ledger.events:
        out = append(out, event_record(event))
    return out


def event_record(event: PrivacyEvent, reservation: str = "") -> dict:
    return {"type": "event", **asdict(event), "reservation": reservation}


def reservation_record(reservation: Reservation) -> dict:
    return {"type": "reservation", "id": reservation.id, **asdict(reservation.planned)}


def release_record(reservation_id: str, reason: str, at: str) -> dict:
    return {"type": "release", "reservation": reservation_id, "reason": reason, "at": at}


def append(ledger: Ledger, body: dict) -> Ledger:
    """``ledger`` with one more record (``seq``, ``prev_hash`` and ``hash`` filled in)."""
    ledger = migrated(ledger)
    record = {**body, "seq": ledger.seq + 1, "prev_hash": ledger.last_hash}
    record["hash"] = record_hash(record, ledger.last_hash)
    built = _Builder(ledger)
    built.add(record, json.dumps(record, sort_keys=True), f"new record {record['seq']}")
    return built.build()


def render(ledger: Ledger) -> str:
    """The full ledger text (the file is rewritten atomically on every write)."""
    return "\n".join(migrated(ledger).lines) + "\n"


# --- the head ----------------------------------------------------------------------------

def merged(history: Iterable[Mechanism]) -> tuple[Mechanism, ...]:
    """Steps summed per (σ, q), in first-seen order (composition is commutative)."""
    return tuple(merge_history(history))


def head_of(ledger: Ledger, epsilon: float | None, at: str) -> Head:
    """The head after the last write of ``ledger`` (δ and accountant of its latest record)."""
    last = ledger.latest
    return Head(ledger.store_id, ledger.seq, ledger.last_hash, merged(ledger.counted()),
                last.delta if last else 0.0, last.accountant if last else "prv",
                epsilon if epsilon is None or math.isfinite(epsilon) else None, at)


def head_text(head: Head) -> str:
    body = {"format": HEAD_FORMAT, **asdict(head), "history": [list(m) for m in head.history]}
    return json.dumps(body, sort_keys=True) + "\n"


def parse_head(text: str, source: str) -> Head:
    """The :class:`Head` of a head file's text; :class:`LedgerError` naming ``source``."""
    try:
        body = json.loads(text)
        if not isinstance(body, dict) or body.get("format") != HEAD_FORMAT:
            raise ValueError
        history = tuple((float(s), float(q), int(t)) for s, q, t in body["history"])
        head = Head(str(body["store_id"]), int(body["seq"]), str(body["hash"]), history,
                    float(body["delta"]), str(body["accountant"]),
                    None if body.get("epsilon") is None else float(body["epsilon"]), str(body["at"]))
    except (ValueError, TypeError, KeyError):
        raise LedgerError(f"{source}: not a storefed ledger head (damaged or edited); restore it "
                          "from backup, or if the ledger is complete: storefed privacy --accept-ledger") from None
    if head.seq < 0 or not all(math.isfinite(s) and s >= 0 and 0 <= q <= 1 and t >= 0 for s, q, t in history):
        raise LedgerError(f"{source}: holds impossible values (damaged or edited)")
    return head


def check_against_head(ledger: Ledger, head: Head, ledger_source: str, head_source: str) -> None:
    """Raise :class:`LedgerError` unless ``ledger`` holds everything ``head`` recorded.

    The ledger may be one write *ahead* of the head (the ledger is written first, so a
    crash between the two writes leaves it so): that never reads as less spent.
    """
    repair = ("; the store trains nothing until its operator acts: restore the ledger from "
              "backup, or run storefed privacy --repair (which keeps the recorded spend)")
    if head.store_id != ledger.store_id:
        raise LedgerError(f"{ledger_source}: belongs to store '{ledger.store_id}' but {head_source} "
                          f"to '{head.store_id}'{repair}")
    if ledger.version == 1:
        raise LedgerError(f"{ledger_source}: an old-format ledger next to {head_source}, which only a "
                          f"newer ledger writes: the ledger was replaced by an older copy{repair}")
    if ledger.seq < head.seq:
        raise LedgerError(f"{ledger_source}: cut short — it ends at record {ledger.seq}, but {head_source} "
                          f"records {head.seq}{_eps_note(head)}{repair}")
    if ledger.hashes[head.seq] != head.hash:
        raise LedgerError(f"{ledger_source}: record {head.seq} does not match {head_source} (the ledger "
                          f"was altered or replaced){repair}")


def _eps_note(head: Head) -> str:
    return f" (ε {head.epsilon:.3f} recorded)" if head.epsilon is not None else ""


# --- the budget check --------------------------------------------------------------------

@dataclass(frozen=True)
class BudgetDecision:
    """Whether a round fits: ``after`` is ε with every event, open reservation and the round;
    ``spent`` is ε without the round (computed only for a decline, which reports it)."""

    fits: bool
    after: float
    spent: float | None = None


def budget_decision(history: Sequence[Mechanism], reservations: Sequence[Mechanism], new: Mechanism,
                    budget: float, epsilon_of: Callable[[list[Mechanism]], float]) -> BudgetDecision:
    """Does ``new`` fit in ``budget`` on top of ``history`` and the open ``reservations``?

    An open reservation counts as spent: another run is training it, or crashed while it
    did. ``epsilon_of`` composes a history at the store's δ (common.privacy.accountant).
    NaN anywhere fails the check.
    """
    counted = [*history, *reservations]
    after = float(epsilon_of([*counted, new]))
    if after <= budget:
        return BudgetDecision(True, after)
    return BudgetDecision(False, after, float(epsilon_of(counted)))


# --- repair ------------------------------------------------------------------------------

def lost_spend(head: Head, surviving: Sequence[Mechanism]) -> list[Mechanism]:
    """What ``head`` counted that the ``surviving`` history lacks: per (σ, q), the missing
    steps. Surviving history plus this is, per (σ, q), at least the head's, so its ε is at
    least the ε the head recorded (ε grows with steps)."""
    have = {(s, q): t for s, q, t in merged(surviving)}
    return [(s, q, t - have.get((s, q), 0)) for s, q, t in head.history if t > have.get((s, q), 0)]


def repaired(salvaged: Ledger, head: Head, at: str) -> tuple[Ledger, list[Mechanism]]:
    """The ledger a repair writes: the intact records of ``salvaged``, its open reservations
    closed (the head already counts them, so they become lost spend rather than something an
    operator could later clear), and one lost-spend event per missing mechanism."""
    ledger = migrated(salvaged)
    for r in ledger.open:
        ledger = append(ledger, release_record(r.id, "repair: counted in the lost-spend events", at))
    lost = lost_spend(head, ledger.history())
    for s, q, t in lost:
        ledger = append(ledger, event_record(PrivacyEvent(
            run_id=LOST_SPEND_RUN, round=0, noise_multiplier=s, sample_rate=q, steps=t, clip_norm=0.0,
            accountant=head.accountant, at=at, delta=head.delta)))
    return ledger, lost
