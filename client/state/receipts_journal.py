"""The store's receipts journal: receipts taken by `storefed serve`, kept durably.

``<state-dir>/receipts.journal.sqlite`` is an SQLite database (standard library ``sqlite3``,
WAL mode, ``synchronous=FULL``). A receipt is one transaction: its header row (``receipts``,
``receipt_id`` the primary key) and all its lines (``lines``, one row per receipt line with
the columns of ``transactions.csv``, DESIGN §3) are committed together and fsync'ed before
the API answers 201. A power cut leaves either the whole receipt or none of it (SQLite's
WAL frames are checksummed; an incomplete commit is rolled back when the file is opened
next), so a client's retry after a cut records the receipt complete. The journal's
directory is fsync'ed when the file is created.

The next training run (and `storefed validate`) reads the journal's lines as more
transaction rows, under the same rules and quarantine as ``transactions.csv``
(:func:`journal_sources` → :func:`common.data.ingest.validate_store` with ``journal=``).
Nothing in the journal can stop a load: a row the reader cannot take as text (a control
character such as NUL, a field too long, a damaged line of the old CSV journal) is handed
to the validator marked with its reason and quarantined like any row; a database that
cannot be read at all is a warning, never an error.

The CSV journal of earlier versions (``receipts.journal.csv``) is kept as it is and read
too (read-only, never written again): nothing in it is lost. A receipt in it whose last
line was cut (a power cut before its fsync) counts as not recorded: its lines are
quarantined (``incomplete_receipt``) and a retry is recorded in the SQLite journal.
"""

from __future__ import annotations

import csv
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from common.data.storefiles import fsync_dir as _fsync_dir  # a name of this module: tests count the syncs

JOURNAL_FILE = "receipts.journal.sqlite"
LEGACY_FILE = "receipts.journal.csv"  # the append-only CSV of earlier versions: read, never written
COLUMNS = ("receipt_id", "ts", "member_id", "item_id", "quantity", "unit_price", "promo", "channel")
# Longest accepted value per field, in characters (the API's limits; the reader's too).
LIMITS = {"receipt_id": 64, "ts": 40, "member_id": 64, "item_id": 64, "quantity": 32, "unit_price": 32,
          "promo": 64, "channel": 16}
REASON_COLUMN = "_fields"  # the reader's mark, as common.data.ingest's CSV reader sets it
_LINE_BYTES_MAX = 4096  # an old-journal line longer than this is damage, not a receipt line

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id TEXT PRIMARY KEY NOT NULL,
    ts TEXT NOT NULL,
    member_id TEXT NOT NULL,
    n_lines INTEGER NOT NULL,
    taken_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY,
    receipt_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    member_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    quantity TEXT NOT NULL,
    unit_price TEXT NOT NULL,
    promo TEXT NOT NULL,
    channel TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lines_by_receipt ON lines (receipt_id);
"""


def journal_path(state_dir: Path) -> Path:
    return Path(state_dir) / JOURNAL_FILE


def legacy_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEGACY_FILE


def text_problem(name: str, value: str) -> str | None:
    """Why ``value`` cannot be the text of field ``name`` (None: it can)."""
    if not value.isprintable():
        return "control_character"
    if len(value) > LIMITS.get(name, 64):
        return "field_too_long"
    return None


def _shown(value: str) -> str:
    """A value as printable text (control characters as escapes), for a quarantine file."""
    out = value if value.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return out if len(out) <= 256 else out[:256] + "…"


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class JournalError(Exception):
    """The journal cannot be written (a damaged database, a full or read-only disk)."""


class Journal:
    """The writer: one connection, one transaction per receipt. Thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.path = journal_path(state_dir)
        self._lock = threading.Lock()
        self._dir_synced = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        try:
            self._con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=FULL")
            self._con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise JournalError(f"{self.path}: cannot be used as the receipts journal ({exc})") from None
        if created:
            _fsync_dir(self.path.parent)  # the new file's directory entry is durable too

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def find(self, receipt_id: str) -> dict | None:
        """The receipt recorded under ``receipt_id`` (lines as the journal keeps them), else None."""
        with self._lock:
            return _find(self._con, receipt_id)

    def record(self, receipt: dict) -> bool:
        """Commit one receipt (receipt_id, ts, member_id, lines[item_id, quantity, unit_price,
        promo?]) with all its lines, durably; False when its id is already recorded."""
        rid, ts, member = str(receipt["receipt_id"]), str(receipt["ts"]), str(receipt["member_id"])
        rows = [(rid, ts, member, str(line["item_id"]), _number(line["quantity"]), repr(float(line["unit_price"])),
                 str(line.get("promo") or ""), "api") for line in receipt["lines"]]
        taken = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            try:
                self._con.execute("BEGIN IMMEDIATE")
                try:
                    self._con.execute("INSERT INTO receipts VALUES (?, ?, ?, ?, ?)", (rid, ts, member, len(rows), taken))
                except sqlite3.IntegrityError:
                    self._con.execute("ROLLBACK")
                    return False
                self._con.executemany("INSERT INTO lines (receipt_id, ts, member_id, item_id, quantity, unit_price, "
                                      "promo, channel) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._con.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'ed before this returns
            except sqlite3.Error as exc:
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
                raise JournalError(f"{self.path}: the receipt could not be recorded ({exc})") from None
            if not self._dir_synced:  # the first commit created the -wal file: make its entry durable
                _fsync_dir(self.path.parent)
                self._dir_synced = True
        return True


def _find(con: sqlite3.Connection, receipt_id: str) -> dict | None:
    head = con.execute("SELECT ts, member_id FROM receipts WHERE receipt_id = ?", (receipt_id,)).fetchone()
    if head is None:
        return None
    lines = con.execute("SELECT item_id, quantity, unit_price FROM lines WHERE receipt_id = ? ORDER BY id",
                        (receipt_id,)).fetchall()
    return {"receipt_id": receipt_id, "ts": head[0], "member_id": head[1],
            "lines": [{"item_id": i, "quantity": q, "unit_price": p} for i, q, p in lines]}


# -- reading -----------------------------------------------------------------------------
@dataclass
class JournalRows:
    """Everything the journal holds, as text rows for the validator."""

    sqlite: pd.DataFrame  # COLUMNS + REASON_COLUMN, in commit order
    legacy: pd.DataFrame  # the same, from the old CSV journal (empty if none)
    warnings: list[str] = field(default_factory=list)
    legacy_receipts: dict[str, dict] = field(default_factory=dict)  # intact receipts of the old journal


def _frame(rows: list[list[str]], reasons: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object) if rows else \
        pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    frame[REASON_COLUMN] = reasons
    return frame.astype("string")


def _checked_row(values: list) -> tuple[list[str], str]:
    """Cells as text (control characters escaped) and the first reason they cannot be used."""
    reason, cells = "", []
    for name, value in zip(COLUMNS, values):
        if value is None:
            value = ""
        elif isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value, reason = value.decode("utf-8", "replace"), reason or "bad_encoding"
        elif not isinstance(value, str):
            value = str(value)
        problem = text_problem(name, value)
        reason = reason or problem or ""
        cells.append(_shown(value) if problem else value)
    return cells, reason


def _read_sqlite(path: Path, warnings: list[str]) -> pd.DataFrame:
    if not path.is_file():
        return _frame([], [])
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            got = con.execute("SELECT receipt_id, ts, member_id, item_id, quantity, unit_price, promo, channel "
                              "FROM lines ORDER BY id").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        warnings.append(f"{path}: the receipts journal cannot be read ({exc}); its receipts are not used until "
                        "it is restored (storefed serve refuses new receipts meanwhile)")
        return _frame([], [])
    rows, reasons = [], []
    for values in got:
        cells, reason = _checked_row(list(values))
        rows.append(cells)
        reasons.append(reason)
    return _frame(rows, reasons)


def _read_legacy(path: Path, warnings: list[str]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The old CSV journal, line by line: a damaged line is one row with its reason; the
    lines of a receipt whose last line was cut are all ``incomplete_receipt``."""
    if not path.is_file():
        return _frame([], []), {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        warnings.append(f"{path}: cannot be read ({exc}); its receipts are not used")
        return _frame([], []), {}
    physical = data.split(b"\n")
    if physical and physical[-1] == b"":
        physical.pop()
    elif physical:
        warnings.append(f"{path}: the last line has no line end (cut by a power loss?); that receipt counts as "
                        "not recorded")
    if physical and physical[0].rstrip(b"\r").decode("utf-8", "replace").strip().lower() == ",".join(COLUMNS):
        physical = physical[1:]
    rows, reasons = [], []
    for raw in physical:
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        reason = ""
        if len(raw) > _LINE_BYTES_MAX:
            raw, reason = raw[:_LINE_BYTES_MAX], "field_too_long"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text, reason = raw.decode("utf-8", "replace"), reason or "bad_encoding"
        try:
            cells = next(csv.reader([text]), [])
        except csv.Error:
            cells, reason = [text], reason or "bad_csv_line"
        if len(cells) != len(COLUMNS):
            reason = reason or ("too_few_fields" if len(cells) < len(COLUMNS) else "too_many_fields")
            cells = (cells + [""] * len(COLUMNS))[:len(COLUMNS)]
        shown, problem = _checked_row(cells)
        rows.append(shown)
        reasons.append(reason or problem)
    # A line cut short ends its receipt's append: the lines written before it in the same
    # append (same receipt id, just above it) are that receipt's too.
    for i, reason in enumerate(reasons):
        if reason != "too_few_fields":
            continue
        rid, j = rows[i][0], i - 1
        while j >= 0 and rows[j][0] == rid and reasons[j] in ("", "incomplete_receipt"):
            reasons[j] = "incomplete_receipt"
            j -= 1
    receipts: dict[str, dict] = {}
    damaged = {rows[i][0] for i, r in enumerate(reasons) if r}
    for cells, reason in zip(rows, reasons):
        if reason or cells[0] in damaged:
            continue
        rec = receipts.setdefault(cells[0], {"receipt_id": cells[0], "ts": cells[1], "member_id": cells[2],
                                             "lines": []})
        rec["lines"].append({"item_id": cells[3], "quantity": cells[4], "unit_price": cells[5]})
    return _frame(rows, reasons), receipts


def read_journal(state_dir: Path) -> JournalRows:
    """The journal (SQLite and the old CSV, if any) as rows for the validator; never raises
    for what the files hold."""
    warnings: list[str] = []
    legacy, receipts = _read_legacy(legacy_path(state_dir), warnings)
    return JournalRows(_read_sqlite(journal_path(state_dir), warnings), legacy, warnings, receipts)


def journal_sources(state_dir: Path, rows: JournalRows | None = None):
    """The journal as :class:`common.data.ingest.TableSource` s (old CSV first, then SQLite)
    for ``validate_store(journal=...)``: read under the same rules as ``transactions.csv``."""
    from common.data.ingest import TableSource

    rows = rows if rows is not None else read_journal(state_dir)
    sources = []
    for path, frame in ((legacy_path(state_dir), rows.legacy), (journal_path(state_dir), rows.sqlite)):
        if len(frame):
            sources.append(TableSource(path, "frame", frame=frame))
    if sources:
        sources[0].warnings.extend(rows.warnings)
    elif rows.warnings:
        sources.append(TableSource(journal_path(state_dir), "frame", frame=_frame([], []), warnings=rows.warnings))
    return sources


def journal_stamp(state_dir: Path) -> tuple:
    """What changes whenever a receipt is recorded, for caches of prepared data: the old CSV's
    size and mtime and the SQLite journal's line count and last row id (with WAL the main
    file's mtime may not move on a commit). () when there is no journal."""
    stamp: list = []
    legacy = legacy_path(state_dir)
    if legacy.exists():
        st = legacy.stat()
        stamp.append(("csv", st.st_size, st.st_mtime_ns))
    path = journal_path(state_dir)
    if path.exists():
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                stamp.append(("sqlite",) + tuple(con.execute("SELECT count(*), max(id) FROM lines").fetchone()))
            finally:
                con.close()
        except sqlite3.Error:
            st = path.stat()
            stamp.append(("unreadable", st.st_size, st.st_mtime_ns))
    return tuple(stamp)
