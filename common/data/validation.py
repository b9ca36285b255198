"""Row rules of the data contract (DESIGN §3) and the fate of every row. Pure: frames in.

Every input row ends **accepted**, **excluded** (usable data that must not train: anonymous,
no consent, netted returns) or **quarantined** (broken: the operator should fix it), and
``rows_in == accepted + excluded + quarantined`` per file. Row rules are pandera schemas;
rules across rows (one timestamp per receipt, unique members, returns) are plain pandas.

Row numbers in problems are 1-based data rows; for a CSV, line = row + 1 (the header).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pandera.pandas as pa

from common.data import contract

# Accepted timestamp spellings, tried in order: ISO-8601 (with T or space, optional
# seconds, fraction, Z or ±hh:mm offset), then day-first dotted, then US slashes.
TS_FORMATS = ("ISO8601", "%d.%m.%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%d.%m.%Y",
              "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y")
# Parsed helper columns and the source column each comes from (problems name the source).
SOURCE_COLUMN = {"_ts": "ts", "_qty": "quantity", "_price": "unit_price", "_join": "join_date",
                 "_birth": "birth_year", "_birth_raw": "birth_year"}
FUTURE_TOLERANCE = pd.Timedelta(minutes=5)  # POS clocks drift; more than this is an error
MAX_PROBLEMS = 20


@dataclass
class FileReport:
    """What happened to one file's rows."""

    rows_in: int = 0
    accepted: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)

    def add(self, bucket: dict[str, int], reason: str, n: int) -> None:
        if n:
            bucket[reason] = bucket.get(reason, 0) + int(n)

    def balanced(self) -> bool:
        return self.rows_in == self.accepted + sum(self.excluded.values()) + sum(self.quarantined.values())

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "accepted": self.accepted, "excluded": dict(self.excluded),
                "quarantined": dict(self.quarantined)}


def parse_timestamps(values: pd.Series, tz: str = "UTC") -> pd.Series:
    """Strings → UTC timestamps (NaT where no accepted format fits).

    Timestamps without an offset are local time of the store's time zone ``tz``.
    """
    text = values.astype("string").str.strip()
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    # pandas reads words such as "now" and "today" as timestamps; a timestamp starts with a digit.
    todo = text.notna() & text.str.match(r"^\d").fillna(False)
    for fmt in TS_FORMATS:
        if not todo.any():
            break
        part = text[todo]
        if fmt == "ISO8601":
            # Offsets differ row to row: parse aware ones to UTC, naive ones in the store's zone.
            has_offset = part.str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True)
            aware = pd.to_datetime(part[has_offset], format="ISO8601", errors="coerce", utc=True)
            naive = pd.to_datetime(part[~has_offset], format="ISO8601", errors="coerce")
            parsed = pd.concat([aware, _localize(naive, tz)]).reindex(part.index)
        else:
            parsed = _localize(pd.to_datetime(part, format=fmt, errors="coerce"), tz)
        ok = parsed.notna()
        out.loc[ok[ok].index] = parsed[ok].astype("datetime64[ns, UTC]")
        todo.loc[ok[ok].index] = False
    return out


def _localize(naive: pd.Series, tz: str) -> pd.Series:
    if len(naive) == 0:
        return pd.Series(pd.NaT, index=naive.index, dtype="datetime64[ns, UTC]")
    # Years beyond pandas' nanosecond range (after 2262) are not timestamps a till writes.
    naive = naive.where((naive >= pd.Timestamp.min) & (naive <= pd.Timestamp.max)).astype("datetime64[ns]")
    return naive.dt.tz_localize(tz, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC")


def _numbers(values: pd.Series) -> pd.Series:
    """Numeric cells, accepting a decimal comma ("2,50") as POS exports in Europe write it."""
    text = values.astype("string").str.strip().str.replace(",", ".", regex=False)
    return pd.to_numeric(text, errors="coerce")


def _schema_failures(frame: pd.DataFrame, schema: pa.DataFrameSchema, null_reasons: dict[str, str]) -> pd.DataFrame:
    """(index, column, reason) of every failed check; a row may fail several.

    A null in a parsed column means the raw cell could not be parsed: ``null_reasons``
    names the reason per column (pandera reports it as ``not_nullable``).
    """
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
        cases = cases[cases["index"].notna()]
        column = cases["column"].astype(str).replace(SOURCE_COLUMN)
        check = cases["check"].astype(str)
        reason = [null_reasons.get(c, "missing_value") if k == "not_nullable" else k for c, k in zip(column, check)]
        return pd.DataFrame({"index": cases["index"].astype(np.int64).to_numpy(), "column": column.to_numpy(),
                             "reason": reason})
    return pd.DataFrame({"index": pd.Series(dtype=np.int64), "column": pd.Series(dtype=str),
                         "reason": pd.Series(dtype=str)})


def _named(check_fn, name: str) -> pa.Check:
    return pa.Check(check_fn, name=name, error=name)


def transaction_schema(catalog_ids: pd.Index, now: pd.Timestamp) -> pa.DataFrameSchema:
    """Row rules of transactions, on the parsed helper columns _ts, _qty, _price."""
    limit = now + FUTURE_TOLERANCE
    return pa.DataFrameSchema({
        "receipt_id": pa.Column("string", _named(lambda s: s.str.strip() != "", "missing_receipt_id")),
        "_ts": pa.Column("datetime64[ns, UTC]", _named(lambda s: s.isna() | (s <= limit), "future_timestamp")),
        "item_id": pa.Column("string", _named(lambda s: s.str.strip().isin(catalog_ids), "unknown_item")),
        "_qty": pa.Column("float64", _named(lambda s: s.isna() | (s != 0), "zero_quantity")),
        "_price": pa.Column("float64", _named(lambda s: s.isna() | (s >= 0), "negative_unit_price")),
    }, strict=False)


def member_schema() -> pa.DataFrameSchema:
    lo, hi = contract.BIRTH_YEAR_RANGE
    return pa.DataFrameSchema({
        "member_id": pa.Column("string", _named(lambda s: s.str.strip() != "", "missing_member_id")),
        "_join": pa.Column("datetime64[ns, UTC]"),
        "_birth": pa.Column("float64", _named(lambda s: s.isna() | ((s >= lo) & (s <= hi) & (s == s.round())),
                                               "bad_birth_year"), nullable=True),
        "_birth_raw": pa.Column("string", nullable=True),
    }, strict=False)


@dataclass
class Quarantine:
    """Rows set aside: original cells plus ``reason`` (and the column at fault)."""

    frames: list[pd.DataFrame] = field(default_factory=list)

    def add(self, rows: pd.DataFrame, reasons: pd.Series, columns: pd.Series, row_numbers: pd.Series) -> None:
        if len(rows):
            self.frames.append(rows.assign(reason=reasons.to_numpy(), column=columns.to_numpy(),
                                           row=row_numbers.to_numpy()))

    def frame(self) -> pd.DataFrame:
        return pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame()


FIELDS_COLUMN = "_fields"  # set by the CSV reader on rows whose field count differs from the header's
# Reasons the reader sets on a row (FIELDS_COLUMN) before any rule: they come first. The
# last five are the receipts journal's (client.state.receipts_journal): text that cannot be a cell.
FIELD_REASONS = ["too_few_fields", "too_many_fields", "bad_encoding", "bad_csv_line", "control_character",
                 "field_too_long", "incomplete_receipt"]


def _field_failures(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(frame without the reader's field-count column, failures of rows with a wrong count)."""
    if FIELDS_COLUMN not in frame.columns:
        return frame, pd.DataFrame({"index": pd.Series(dtype=np.int64), "column": pd.Series(dtype=str),
                                    "reason": pd.Series(dtype=str)})
    marks = frame[FIELDS_COLUMN].astype(str)
    bad = marks != ""
    failures = pd.DataFrame({"index": frame.index[bad].to_numpy(dtype=np.int64), "column": "",
                             "reason": marks[bad].to_numpy()})
    return frame.drop(columns=[FIELDS_COLUMN]), failures


def _first_reason(failures: pd.DataFrame, index: pd.Index, order: list[str]) -> pd.DataFrame:
    """For each failing row, the reason that comes first in ``order`` (and its column)."""
    if failures.empty:
        return failures
    rank = failures["reason"].map({r: i for i, r in enumerate(order)}).fillna(len(order))
    return failures.assign(rank=rank).sort_values(["index", "rank"]).drop_duplicates("index")


TX_REASON_ORDER = ["missing_value", "missing_receipt_id", "bad_timestamp", "future_timestamp", "unknown_item",
                   "bad_quantity", "zero_quantity", "bad_unit_price", "negative_unit_price"]


@dataclass
class MembersResult:
    report: FileReport
    consent: pd.Series  # member_id → bool, for accepted members (consenting or not)
    profiles: pd.DataFrame  # accepted rows, original columns
    quarantine: pd.DataFrame
    problems: list[dict]


def check_members(members: pd.DataFrame, source: str, assume_consent: bool) -> MembersResult:
    """Members: rules per row, then unique ids; consent parsed (true/false/yes/no/1/0)."""
    report = FileReport(rows_in=len(members))
    frame, field_failures = _field_failures(members.astype("string").fillna(""))
    birth_raw = frame["birth_year"] if "birth_year" in frame else pd.Series("", index=frame.index, dtype="string")
    parsed = frame.assign(
        _join=parse_timestamps(frame["join_date"]),
        _birth=_numbers(birth_raw.where(birth_raw.str.strip() != "", None)).astype("float64"),
        _birth_raw=birth_raw,
    )
    failures = _first_reason(pd.concat([field_failures, _schema_failures(parsed, member_schema(),
                                                                         {"join_date": "bad_join_date"})]),
                             frame.index,
                             FIELD_REASONS + ["missing_value", "missing_member_id", "bad_join_date", "bad_birth_year"])
    if "consent_training" in frame:
        consent = frame["consent_training"].map(contract.parse_consent)
        bad_consent = consent.isna() & ~frame.index.isin(failures["index"])
        extra = pd.DataFrame({"index": frame.index[bad_consent], "column": "consent_training",
                              "reason": "bad_consent"})
        failures = pd.concat([failures, extra], ignore_index=True)
    else:
        # No consent column: nobody may train unless the node assumes consent (the store
        # is then refused as a whole; its members are counted as not consenting).
        consent = pd.Series(bool(assume_consent), index=frame.index)
    ids = frame["member_id"].str.strip()
    dup = ids.duplicated(keep=False) & (ids != "") & ~frame.index.isin(failures["index"])
    failures = pd.concat([failures, pd.DataFrame({"index": frame.index[dup], "column": "member_id",
                                                  "reason": "duplicate_member_id"})], ignore_index=True)
    bad = frame.index.isin(failures["index"])
    quarantine, problems = _set_aside(frame, failures, source, report)
    good = frame[~bad]
    consent_by_id = pd.Series(consent[~bad].astype(bool).to_numpy(), index=ids[~bad].to_numpy())
    report.add(report.excluded, "no_consent", int((~consent_by_id).sum()))
    report.accepted = int(len(good) - sum(report.excluded.values()))
    return MembersResult(report, consent_by_id, good, quarantine, problems)


def _set_aside(frame: pd.DataFrame, failures: pd.DataFrame, source: str, report: FileReport,
               row_offset: int = 0) -> tuple[pd.DataFrame, list[dict]]:
    """Quarantine rows named in ``failures`` (one reason each); count them; list problems."""
    if failures.empty:
        return pd.DataFrame(), []
    failures = failures.drop_duplicates("index")
    rows = frame.loc[failures["index"]]
    row_numbers = failures["index"].to_numpy() + 1 + row_offset
    for reason, n in failures["reason"].value_counts().items():
        report.add(report.quarantined, str(reason), n)
    quarantine = rows.assign(reason=failures["reason"].to_numpy(), column=failures["column"].to_numpy(),
                             row=row_numbers)
    problems = [
        {"file": source, "row": int(r), "column": str(c),
         "value": str(frame.at[i, c]) if c in frame.columns else "", "reason": str(reason)}
        for i, r, c, reason in zip(failures["index"][:MAX_PROBLEMS], row_numbers[:MAX_PROBLEMS],
                                   failures["column"][:MAX_PROBLEMS], failures["reason"][:MAX_PROBLEMS])
    ]
    return quarantine, problems


@dataclass
class TransactionChunk:
    """One chunk's outcome before the rules across rows (receipts, returns) are applied."""

    lines: pd.DataFrame  # member lines that passed the row rules: member, item_id, ts, qty, receipt, row, coupon
    anonymous: pd.DataFrame  # anonymous lines that passed: item_id, ts, qty, receipt, row, coupon
    quarantine: pd.DataFrame
    problems: list[dict]


def check_transaction_chunk(chunk: pd.DataFrame, catalog_ids: pd.Index, now: pd.Timestamp, source: str,
                            report: FileReport, row_offset: int, tz: str = "UTC") -> TransactionChunk:
    """Row rules on one chunk (rows ``row_offset+1 …``); counts go into ``report``."""
    frame, field_failures = _field_failures(chunk.astype("string").fillna(""))
    report.rows_in += len(frame)
    parsed = frame.assign(_ts=parse_timestamps(frame["ts"], tz), _qty=_numbers(frame["quantity"]).astype("float64"),
                          _price=_numbers(frame["unit_price"]).astype("float64"))
    nulls = {"ts": "bad_timestamp", "quantity": "bad_quantity", "unit_price": "bad_unit_price"}
    failures = _first_reason(pd.concat([field_failures, _schema_failures(parsed, transaction_schema(catalog_ids, now),
                                                                         nulls)]),
                             frame.index, FIELD_REASONS + TX_REASON_ORDER)
    quarantine, problems = _set_aside(frame, failures, source, report, row_offset)
    ok = ~frame.index.isin(failures["index"])
    good = parsed[ok]
    member = good["member_id"].str.strip()
    # A coupon line (DESIGN §5.4: a campaign audience reads the member's coupon history): its
    # promo field names a coupon, e.g. "coupon" or "retail+coupon".
    coupon = (good["promo"].str.lower().str.contains("coupon", regex=False).to_numpy(dtype=bool)
              if "promo" in good.columns else np.zeros(len(good), dtype=bool))
    cols = {"item_id": good["item_id"].str.strip(), "ts": good["_ts"], "qty": good["_qty"],
            "receipt": good["receipt_id"].str.strip(), "row": good.index.to_numpy() + 1 + row_offset,
            "coupon": coupon}
    lines = pd.DataFrame({"member": member, **cols})[member != ""]
    anonymous = pd.DataFrame(cols)[member == ""]
    return TransactionChunk(lines, anonymous, quarantine, problems)


def receipt_conflicts(frames: list[pd.DataFrame]) -> set[str]:
    """Receipt ids that carry more than one timestamp (across every given frame)."""
    pairs = pd.concat([f[["receipt", "ts"]] for f in frames if len(f)], ignore_index=True) if frames else None
    if pairs is None or pairs.empty:
        return set()
    counts = pairs.drop_duplicates().groupby("receipt").size()
    return set(counts.index[counts > 1])


def net_returns(lines: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Subtract each return from the member's latest earlier purchases of the item.

    ``lines`` has integer-coded ``member`` and ``item_id`` columns plus ``ts`` and ``qty``.
    Returns the purchase lines left (quantity reduced) and excluded counts: return lines
    (``return_netted``, or ``return_unmatched`` when no earlier purchase is in the data) and
    purchases netted to zero (``return_netted``).
    """
    counts: dict[str, int] = {}
    qty = lines["qty"].to_numpy(dtype=float)
    is_return = qty < 0
    if not is_return.any():
        return lines, counts
    width = int(lines["item_id"].max()) + 1
    key = lines["member"].to_numpy(dtype=np.int64) * width + lines["item_id"].to_numpy(dtype=np.int64)
    ts = lines["ts"].to_numpy()
    qty = qty.copy()
    # Only purchases of (member, item) pairs that were ever returned can change.
    relevant = np.flatnonzero(np.isin(key, key[is_return]) & ~is_return)
    relevant = relevant[np.argsort(ts[relevant], kind="stable")]
    buys: dict[int, list[int]] = {}
    for i in relevant:
        buys.setdefault(int(key[i]), []).append(int(i))
    unmatched = 0
    returns = np.flatnonzero(is_return)
    for r in returns[np.argsort(ts[returns], kind="stable")]:
        left = -qty[r]
        for b in reversed(buys.get(int(key[r]), [])):
            if left <= 0:
                break
            if ts[b] > ts[r] or qty[b] <= 0:
                continue
            take = min(left, qty[b])
            qty[b] -= take
            left -= take
        if left == -qty[r]:
            unmatched += 1
    netted_purchases = int(((qty <= 0) & ~is_return).sum())
    counts["return_netted"] = int(is_return.sum()) - unmatched + netted_purchases
    if unmatched:
        counts["return_unmatched"] = unmatched
    kept = qty > 0
    return lines[kept].assign(qty=qty[kept]), {k: v for k, v in counts.items() if v}
