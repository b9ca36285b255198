"""What left the store, reply by reply: the store's own record for its privacy page.

Every reply the ClientApp sends — a trained round's values, an evaluation's metrics, the
acknowledgement of a delivered model, a decline (budget) or a refusal (it cannot or will
not train) with its reason — is written here before it leaves, as one JSON line:

``{"at", "run_id", "round", "message", "outcome", "values", "arrays", "reason", "signed_by"}``

``values`` holds only the keys :mod:`common.exchange.wire` lists for that reply (the log is
filtered by the same lists as the replies themselves); ``arrays`` only how many tensors and
bytes the model or update had, never their values. Nothing here is new to anyone: each
entry is what the server received.

The file is ``<state>/replies.jsonl``; it keeps the last :data:`KEEP` replies and is
rewritten atomically under a lock (a crash leaves the old file or the new one). It is
written only into a state directory that exists: logging never creates the store's
state directory (a message refused before the store read anything leaves nothing behind
but this line, and not even that on a store that has no state yet).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping

from client.state.file_lock import locked
from common.data.storefiles import atomic_write_text
from common.exchange import wire

LOG_FILE = "replies.jsonl"
KEEP = 500  # replies kept: 10-round runs, train and evaluate, for about 25 runs
OUTCOMES = ("sent", "declined", "refused", "failed")

# The keys each kind of reply may carry, as common.exchange.wire lists them.
ALLOWED: dict[str, tuple[str, ...]] = {
    "train": (*wire.TRAIN_METRICS, *wire.TRAIN_CONFIG),
    "evaluate": (*wire.EVAL_METRICS, *wire.EVAL_CONFIG),
    wire.MODEL_MESSAGE: wire.MODEL_ACK_CONFIG,
    wire.EXPLORE_MESSAGE: (*wire.EXPLORE_METRICS, *wire.EXPLORE_CONFIG),
    "declined": wire.DECLINE_KEYS,
    "refused": wire.REFUSE_KEYS,
}


def log_path(state_dir: Path) -> Path:
    """Where a store's reply log is."""
    return Path(state_dir) / LOG_FILE


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def listed_values(kind: str, values: Mapping[str, object]) -> dict:
    """``values`` restricted to the keys wire lists for ``kind`` (a reply kind or an outcome)."""
    allowed = ALLOWED.get(kind, ())
    return {k: values[k] for k in allowed if k in values}


def entry(*, message: str, outcome: str, run_id: str, server_round: int, values: Mapping[str, object] | None = None,
          arrays: tuple[int, int] | None = None, reason: str | None = None, signed_by: str | None = None) -> dict:
    """One log line: ``message`` the message type (train, evaluate, query.model, query.explore), ``outcome``
    one of :data:`OUTCOMES`, ``arrays`` (tensors, bytes) of the model that left (None: none)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    kind = outcome if outcome in ("declined", "refused") else message
    return {"at": _now(), "run_id": str(run_id), "round": int(server_round), "message": str(message),
            "outcome": outcome, "values": listed_values(kind, dict(values or {})),
            "arrays": None if arrays is None else {"tensors": int(arrays[0]), "bytes": int(arrays[1])},
            "reason": None if reason is None else str(reason)[:wire.REFUSE_REASON_MAX],
            "signed_by": signed_by or None}


def _finite(value: object) -> object:
    """JSON has no infinity or NaN: such a number (ε without DP) is written as null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError):
        return []  # an unreadable log is replaced by a new one: it only describes, it never decides
    return [line for line in text.split("\n") if line.strip()]


def record(state_dir: Path, item: dict) -> bool:
    """Add ``item`` (from :func:`entry`) to the log, keeping the last :data:`KEEP`; False
    (nothing written) when the state directory does not exist."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return False
    clean = {**item, "values": {k: _finite(v) for k, v in dict(item.get("values") or {}).items()}}
    line = json.dumps(clean, sort_keys=True, allow_nan=False)
    with locked(state_dir / f".{LOG_FILE}.lock"):
        kept = _lines(log_path(state_dir))[-(KEEP - 1):]
        atomic_write_text(log_path(state_dir), "\n".join([*kept, line]) + "\n")
    return True


def read_log(state_dir: Path, limit: int | None = None) -> list[dict]:
    """The log's entries, oldest first (the last ``limit`` when given); a damaged line is
    skipped, and a missing log is empty."""
    out = []
    for line in _lines(log_path(state_dir)):
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("outcome") in OUTCOMES:
            out.append(item)
    return out[-limit:] if limit else out


def refusals(entries: Iterable[dict]) -> list[dict]:
    """The entries where the store did not train or answer: declines, refusals, failures."""
    return [e for e in entries if e.get("outcome") != "sent"]
