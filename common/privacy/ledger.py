"""The privacy ledger's content (DESIGN §4.2): events, their text form, their checks. Pure.

A ledger is a JSON-lines text: a header line, then one event per trained round. Every
event carries its sequence number and the SHA-256 of the line before it, so an edited,
reordered, truncated-in-the-middle or half-written ledger is detected rather than read
as less spending than there was. The file itself lives at the store (client.ledger).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

FORMAT = "storefed-privacy-ledger"
VERSION = 1


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

    def mechanism(self) -> tuple[float, float, int]:
        """The Opacus-accountant history entry ``(noise_multiplier, sample_rate, steps)``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def header_line(store_id: str) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "store_id": store_id}, sort_keys=True)


def event_line(event: PrivacyEvent, seq: int, previous_line: str) -> str:
    """The text line of ``event`` as number ``seq``, chained to ``previous_line``."""
    record = {**asdict(event), "seq": seq, "prev": _digest(previous_line)}
    return json.dumps(record, sort_keys=True)


_FIELDS = {
    "run_id": str, "round": int, "noise_multiplier": float, "sample_rate": float, "steps": int,
    "clip_norm": float, "accountant": str, "at": str, "delta": float,
}


def parse(text: str, source: str) -> tuple[str, list[PrivacyEvent]]:
    """(store_id, events) of a ledger text; :class:`LedgerError` naming ``source`` otherwise."""
    if not text.endswith("\n"):
        raise LedgerError(f"{source}: the last line is incomplete (a write was cut off); "
                          "restore the ledger from backup — spent budget cannot be assumed to be less")
    lines = text[:-1].split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise LedgerError(f"{source}: line 1 is not a ledger header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LedgerError(f"{source}: not a storefed privacy ledger")
    if header.get("version") != VERSION:
        raise LedgerError(f"{source}: ledger version {header.get('version')} is not supported")
    events = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LedgerError(f"{source}: line {i} is not valid JSON; the ledger is corrupted") from None
        if not isinstance(record, dict) or record.get("seq") != i - 1 or record.get("prev") != _digest(lines[i - 2]):
            raise LedgerError(f"{source}: line {i} does not follow line {i - 1} (edited, reordered or "
                              "lines lost); the ledger is corrupted")
        try:
            values = {k: kind(record[k]) for k, kind in _FIELDS.items()}
        except (KeyError, TypeError, ValueError):
            raise LedgerError(f"{source}: line {i} lacks a field of {', '.join(_FIELDS)}") from None
        if values["steps"] < 0 or values["noise_multiplier"] < 0 or not 0 <= values["sample_rate"] <= 1:
            raise LedgerError(f"{source}: line {i} holds impossible values")
        events.append(PrivacyEvent(**values))
    return str(header.get("store_id", "")), events


def render(store_id: str, events: list[PrivacyEvent]) -> str:
    """The full ledger text for ``events`` (used to append: the file is rewritten atomically)."""
    lines = [header_line(store_id)]
    for seq, event in enumerate(events, start=1):
        lines.append(event_line(event, seq, lines[-1]))
    return "\n".join(lines) + "\n"
