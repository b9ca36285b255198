"""The store's receipts journal: receipts taken by `storefed serve`, kept durably.

``<state-dir>/receipts.journal.csv`` has the columns of ``transactions.csv`` (DESIGN §3), one
row per receipt line. A receipt is appended and fsync'ed before the API answers 201, so an
answer means the receipt survives a crash or a restart. The next training run reads the
journal as more transaction rows, under the same rules and quarantine
(:func:`common.data.ingest.validate_store` with ``journal=``).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

JOURNAL_FILE = "receipts.journal.csv"
COLUMNS = ("receipt_id", "ts", "member_id", "item_id", "quantity", "unit_price", "promo", "channel")


def journal_path(state_dir: Path) -> Path:
    return Path(state_dir) / JOURNAL_FILE


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1) == b"\n"


def append_receipt(state_dir: Path, receipt: dict) -> None:
    """Append one receipt's lines (``receipt``: receipt_id, ts, member_id, lines[…]) durably."""
    path = journal_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[str(receipt["receipt_id"]), str(receipt["ts"]), str(receipt["member_id"]), str(line["item_id"]),
             repr(float(line["quantity"])) if not float(line["quantity"]).is_integer() else str(int(line["quantity"])),
             repr(float(line["unit_price"])), str(line.get("promo") or ""), "api"] for line in receipt["lines"]]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            os.write(fd, _csv_text([list(COLUMNS)]).encode("utf-8"))
        elif not _ends_with_newline(path, size):
            # A torn write (power cut) left a partial line: end it, so the reader quarantines
            # that one row (too_few_fields) and this receipt starts on a line of its own.
            os.write(fd, b"\n")
        os.write(fd, _csv_text(rows).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)

