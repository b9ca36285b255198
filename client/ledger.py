"""The privacy ledger file at a store: read, and append one event durably.

Append = lock, read and verify the whole ledger, write the new text to a temp file, fsync,
rename over the old one, fsync the directory. A crash leaves the old ledger or the new one,
never half of one; two processes for the same store serialise on the lock.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.privacy.ledger import LedgerError, PrivacyEvent, parse, render
from common.data.storefiles import atomic_write_text

LEDGER_FILE = "privacy-ledger.jsonl"


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_FILE


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f".{LEDGER_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path, store_id: str) -> list[PrivacyEvent]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot be read ({exc.__class__.__name__}); training stops until "
                          "the ledger is restored") from None
    owner, events = parse(text, str(path))
    if store_id and owner != store_id:
        raise LedgerError(f"{path}: this ledger belongs to store '{owner}', not '{store_id}'")
    return events


def read_events(state_dir: Path, store_id: str = "") -> list[PrivacyEvent]:
    """All events of the store's ledger (empty when there is no ledger yet)."""
    with _locked(Path(state_dir)):
        return _read(ledger_path(state_dir), store_id)


def append_event(state_dir: Path, store_id: str, event: PrivacyEvent) -> list[PrivacyEvent]:
    """Durably add ``event``; returns every event including it. Raises LedgerError."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        events = _read(ledger_path(state_dir), store_id) + [event]
        atomic_write_text(ledger_path(state_dir), render(store_id, events))
        return events
