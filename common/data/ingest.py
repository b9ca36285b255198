"""Reading a store's real files, validating them, and setting bad rows aside (DESIGN §3).

The I/O edge around :mod:`common.data.validation`: sniffs encodings and delimiters, reads in
chunks (bounded memory on stores of millions of lines), keeps accepted lines in a compact
integer form, and writes quarantined rows to ``<state>/quarantine/<file>`` with a reason so
an operator can fix and re-feed them. ``storefed validate`` and the ClientApp both call
:func:`validate_store`, so training uses exactly the rows the report calls accepted.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from common.data import contract
from common.privacy.published_size import bucket, declared_size, size_warning
from common.data.storefiles import DataError, atomic_write_bytes, locate, read_catalog, read_store_meta
from common.data.validation import (
    MAX_PROBLEMS,
    FileReport,
    check_members,
    check_transaction_chunk,
    net_returns,
    receipt_conflicts,
)

CHUNK_ROWS = 250_000
_SNIFF_BYTES = 64 * 1024
_DELIMITERS = (",", ";", "\t", "|")


@dataclass
class TableSource:
    """How to read one table file."""

    path: Path
    kind: str  # "csv", "parquet" or "frame" (rows already read as text, e.g. the receipts journal)
    encoding: str = "utf-8"
    delimiter: str = ","
    warnings: list[str] = field(default_factory=list)
    frame: pd.DataFrame | None = None  # kind "frame": string columns, FIELDS_COLUMN marks rows set aside


def sniff(path: Path) -> TableSource:
    """Encoding and delimiter of a CSV (or a Parquet source); DataError when unreadable."""
    if path.suffix == ".parquet":
        return TableSource(path, "parquet")
    head = path.read_bytes()[:_SNIFF_BYTES] if path.stat().st_size else b""
    if not head:
        raise DataError(f"{path}: the file is empty (not even a header line); export it again")
    if b"\x00" in head:
        raise DataError(f"{path}: this is a binary file, not a CSV text file; export the table as CSV "
                        "(or Parquet with a .parquet name)")
    warnings = []
    try:
        text = head.decode("utf-8-sig")
        encoding = "utf-8-sig"
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 4:  # a character cut by the sniffing window
            text, encoding = head[: exc.start].decode("utf-8-sig"), "utf-8-sig"
        else:
            text, encoding = head.decode("latin-1"), "latin-1"
            warnings.append(f"{path}: not UTF-8; read as Latin-1 — check accented names")
    header = text.splitlines()[0] if text.splitlines() else ""
    delimiter = max(_DELIMITERS, key=header.count)
    if header.count(delimiter) == 0:
        delimiter = ","
    if delimiter != ",":
        warnings.append(f"{path}: columns separated by {delimiter!r} rather than ','")
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        if fh.read(1) not in (b"\n", b"\r"):
            warnings.append(f"{path}: the last line has no line end, so the file may have been cut short; "
                            "check that its last row is complete (export it again if not)")
    return TableSource(path, "csv", encoding, delimiter, warnings)


_SCAN_BYTES = 16 * 1024 * 1024
FIELDS_COLUMN = "_fields"  # per row: "", "too_few_fields" or "too_many_fields"


def field_counts(source: TableSource) -> np.ndarray:
    """The number of fields of every data row of a CSV (header and blank lines left out).

    pandas fills a row cut short with empty cells, so the count comes from the bytes: a
    vectorised scan of delimiters per line, in blocks (bounded memory), for files without
    quotes; the csv module, row by row, for files with quotes (a quoted field may hold a
    delimiter or a line end).
    """
    delim = ord(source.delimiter)
    counts: list[np.ndarray] = []
    with open(source.path, "rb") as fh:
        fh.readline()
        carry = b""
        while True:
            block = fh.read(_SCAN_BYTES)
            if b'"' in block:
                return _field_counts_quoted(source)
            if not block:
                block, carry = carry, b""
                if not block:
                    break
                block += b"\n"
            else:
                block = carry + block
                cut = block.rfind(b"\n")
                if cut < 0:
                    carry = block
                    continue
                block, carry = block[:cut + 1], block[cut + 1:]
            arr = np.frombuffer(block, dtype=np.uint8)
            ends = np.flatnonzero(arr == 10)
            starts = np.r_[0, ends[:-1] + 1]
            delims = np.flatnonzero(arr == delim)  # memory ~ the block, not 8× it as a cumsum would be
            n_delims = np.searchsorted(delims, ends) - np.searchsorted(delims, starts)
            length = ends - starts - (arr[np.maximum(ends - 1, 0)] == 13)
            counts.append((n_delims + 1)[length > 0])
    return np.concatenate(counts) if counts else np.empty(0, np.int64)


def _field_counts_quoted(source: TableSource) -> np.ndarray:
    with open(source.path, encoding=source.encoding, newline="") as fh:
        fh.readline()
        return np.array([len(row) for row in csv.reader(fh, delimiter=source.delimiter) if row], dtype=np.int64)


_ARROW_KINDS = {
    "receipt_id": ("string", "integer"), "member_id": ("string", "integer"), "item_id": ("string", "integer"),
    "ts": ("string", "timestamp", "date"), "quantity": ("string", "integer", "floating", "decimal"),
    "unit_price": ("string", "integer", "floating", "decimal"), "join_date": ("string", "timestamp", "date"),
    "birth_year": ("string", "integer", "floating", "null"), "consent_training": ("string", "boolean", "integer"),
}


def _arrow_kind(arrow_type) -> str:
    import pyarrow.types as t

    for kind, test in (("string", lambda x: t.is_string(x) or t.is_large_string(x)), ("integer", t.is_integer),
                       ("floating", t.is_floating), ("decimal", t.is_decimal), ("timestamp", t.is_timestamp),
                       ("date", t.is_date), ("boolean", t.is_boolean), ("null", t.is_null)):
        if test(arrow_type):
            return kind
    return str(arrow_type)


def read_header(source: TableSource) -> list[str]:
    """Column names, lower-cased and stripped."""
    if source.kind == "frame":
        return [str(c).strip().lower() for c in source.frame.columns if c != FIELDS_COLUMN]
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(source.path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{source.path}: not a readable Parquet file ({exc.__class__.__name__}); "
                            "export it again") from None
        for name in schema.names:
            want = _ARROW_KINDS.get(name.strip().lower())
            kind = _arrow_kind(schema.field(name).type)
            if want and kind not in want:
                raise DataError(f"{source.path}: column '{name}' has type {schema.field(name).type}, expected "
                                f"{' or '.join(want)}; fix the export's column types")
        return [n.strip().lower() for n in schema.names]
    with open(source.path, encoding=source.encoding, newline="") as fh:
        first = fh.readline()
    return [c.strip().lower() for c in next(csv.reader([first], delimiter=source.delimiter), [])]


def read_chunks(source: TableSource, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The table as string frames of at most ``chunk_rows`` rows, column names normalised."""
    if source.kind == "frame":
        for start in range(0, len(source.frame), chunk_rows):
            yield source.frame.iloc[start:start + chunk_rows].reset_index(drop=True).copy()
        return
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(source.path).iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas().astype("string").fillna("")
            frame.columns = [str(c).strip().lower() for c in frame.columns]
            yield frame
        return
    header = read_header(source)
    counts = field_counts(source)
    # Read every row, however many fields it has (extra names catch extra fields), then
    # mark the rows whose field count differs from the header's: they are quarantined.
    names = _unique(header) + [f"_extra{i}" for i in range(_EXTRA_FIELDS)]
    try:
        reader = pd.read_csv(source.path, dtype=str, keep_default_na=False, encoding=source.encoding,
                             sep=source.delimiter, chunksize=chunk_rows, skipinitialspace=False,
                             header=None, skiprows=1, names=names)
        offset = 0
        for frame in reader:
            frame = frame.iloc[:, :len(header)].copy()
            n = counts[offset:offset + len(frame)]
            offset += len(frame)
            if len(n) == len(frame) and (n != len(header)).any():
                frame[FIELDS_COLUMN] = np.where(n > len(header), "too_many_fields",
                                                np.where(n < len(header), "too_few_fields", ""))
            yield frame
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{source.path}: cannot be parsed as CSV ({str(exc).splitlines()[0]}); check quoting and "
                        "the delimiter") from None


_EXTRA_FIELDS = 16  # a row with more extra fields than this makes the file unreadable (named)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        out.append(name if name not in seen else f"{name}.{seen[name]}")
        seen[name] = seen.get(name, 0) + 1
    return out


class Codes:
    """A growing string → int code table (member ids, receipt ids)."""

    def __init__(self) -> None:
        self.index = pd.Index([], dtype=object)

    def encode(self, values: pd.Series) -> np.ndarray:
        values = values.astype(object)
        codes = self.index.get_indexer(values)
        if (codes < 0).any():
            new = pd.Index(pd.unique(values[codes < 0]))
            self.index = self.index.append(new)
            codes = self.index.get_indexer(values)
        return codes.astype(np.int64)


@dataclass
class StoreValidation:
    """The outcome of validating one store directory."""

    store_id: str
    usable: bool
    files: dict[str, FileReport]
    problems: list[dict]
    warnings: list[str]
    fatal: list[str]
    lines: pd.DataFrame | None = None  # accepted member lines: member, item, day, qty, receipt
    anonymous: pd.DataFrame | None = None  # anonymous purchases: item, day, qty
    members: pd.DataFrame | None = None  # accepted member rows (original columns)
    consent: pd.Series | None = None  # member_id → consent, accepted members
    receipt_ids: pd.Index | None = None  # every receipt id with an accepted row (the lines' "receipt" codes)
    size: dict | None = None  # published size against the members who can train (local only)

    def as_dict(self) -> dict:
        return {"store_id": self.store_id, "usable": self.usable,
                "files": {k: v.as_dict() for k, v in self.files.items()},
                "problems": self.problems, "warnings": self.warnings, "fatal": self.fatal, "size": self.size}


def _write_quarantine(directory: Path | None, name: str, frames: list[pd.DataFrame]) -> None:
    if directory is None:
        return
    target = directory / name
    frames = [f for f in frames if len(f)]
    if not frames:
        target.unlink(missing_ok=True)
        return
    quarantine = pd.concat(frames, ignore_index=True)
    ordered = ["row", "reason", "column"] + [c for c in quarantine.columns if c not in ("row", "reason", "column")]
    buf = io.StringIO()
    quarantine[ordered].sort_values("row", kind="stable").to_csv(buf, index=False, lineterminator="\n")
    atomic_write_bytes(target, buf.getvalue().encode("utf-8"))


def validate_store(store_dir: Path, catalog_dir: Path, *, now: pd.Timestamp | None = None,
                   assume_consent: bool | None = None, quarantine_dir: Path | None = None,
                   keep_data: bool = True, chunk_rows: int = CHUNK_ROWS,
                   journal: Path | TableSource | list | None = None) -> StoreValidation:
    """Validate a store directory against the contract; see the module docstring.

    ``journal``: the store's receipts journal (receipts taken by `storefed serve`): a CSV
    with the transaction columns, or sources of its rows
    (:func:`client.state.receipts_journal.journal_sources`); its rows are read as more transaction
    rows, under the same rules, and counted in the transactions report (its rows are numbered
    on from the last row of the transactions file). A journal receipt whose id is also in the
    transactions file is the journal's mistake: its journal rows are quarantined
    (``receipt_id_in_transactions``), never the file's.

    A file that cannot be used at all makes the store unusable (``fatal`` says why); row
    problems only set rows aside. ``keep_data`` keeps the accepted lines for training.
    """
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise DataError(f"{store_dir}: store directory not found")
    meta = read_store_meta(store_dir)
    store_id = str(meta["store_id"])
    if assume_consent is None:
        assume_consent = bool(meta.get("assume_consent", False))
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    tz = str(meta.get("timezone", "UTC"))
    catalog = read_catalog(catalog_dir)
    catalog_ids = pd.Index(catalog["item_id"].astype(str).str.strip())
    files: dict[str, FileReport] = {}
    problems: list[dict] = []
    warnings: list[str] = []
    fatal: list[str] = []

    def source_for(csv_name: str, required: tuple[str, ...], known: tuple[str, ...]) -> TableSource | None:
        path = locate(store_dir, csv_name)
        if path is None:
            fatal.append(f"{store_dir / csv_name}: file not found")
            return None
        try:
            source = sniff(path)
            header = read_header(source)
        except DataError as exc:
            fatal.append(str(exc))
            return None
        warnings.extend(source.warnings)
        missing = [c for c in required if c not in header]
        if missing:
            fatal.append(f"{path}: required column '{missing[0]}' is missing (columns found: "
                         f"{', '.join(header) or 'none'}); add it as DESIGN §3 describes")
            return None
        for extra in (c for c in header if c not in known):
            warnings.append(f"{path}: unknown column '{extra}' kept but not used")
        return source

    # Members first: transactions need their consent.
    members_result = None
    msource = source_for(contract.MEMBERS_FILE, contract.MEMBER_REQUIRED, contract.MEMBER_COLUMNS)
    if msource is not None:
        try:
            members_frame = pd.concat(list(read_chunks(msource, chunk_rows)), ignore_index=True)
        except DataError as exc:
            fatal.append(str(exc))
            members_frame = None
        if members_frame is not None:
            members_result = check_members(members_frame, str(msource.path), assume_consent)
            files["members"] = members_result.report
            problems.extend(members_result.problems)
            _write_quarantine(quarantine_dir, msource.path.name, [members_result.quarantine])
            if "consent_training" not in members_frame.columns and not assume_consent:
                fatal.append(f"{msource.path}: no 'consent_training' column, so no member may train; add the "
                             "column, or set assume_consent = true in store.json if consent is given otherwise")
            if "home_store" not in members_frame.columns:
                warnings.append(f"{msource.path}: no 'home_store' column, so every member with receipts here "
                                "trains here; a member who also trains at other stores then spends the sum of "
                                "their ε (add the store where each card was registered, from the chain's "
                                "membership system)")
            if members_result.report.rows_in == 0:
                fatal.append(f"{msource.path}: no member rows (header only)")

    tsource = source_for(contract.TRANSACTIONS_FILE, contract.TRANSACTION_REQUIRED, contract.TRANSACTION_COLUMNS)
    tx_report = FileReport()
    lines_parts, anon_parts, quarantine_parts = [], [], []
    members_codes, receipts = Codes(), Codes()
    item_pos = pd.Index(catalog_ids)
    segments: list[tuple[TableSource, int]] = []  # (source, number of rows before it)
    if tsource is not None:
        offset = 0
        try:
            sources = [tsource]
            for jsource in (journal if isinstance(journal, list) else [journal] if journal is not None else []):
                if not isinstance(jsource, TableSource):
                    if not (Path(jsource).is_file() and Path(jsource).stat().st_size):
                        continue
                    jsource = sniff(Path(jsource))
                warnings.extend(jsource.warnings)
                sources.append(jsource)
            for source in sources:
                segments.append((source, offset))
                for chunk in read_chunks(source, chunk_rows):
                    result = check_transaction_chunk(chunk, catalog_ids, now, str(source.path), tx_report, offset, tz)
                    offset += len(chunk)
                    for p in result.problems:
                        p["row"] -= segments[-1][1]  # a problem names the row of its own file
                    quarantine_parts.append(result.quarantine)
                    problems.extend(result.problems[: max(0, MAX_PROBLEMS - len(problems))])
                    lines_parts.append(_compact(result.lines, item_pos, receipts, members_codes))
                    anon_parts.append(_compact(result.anonymous, item_pos, receipts, None))
        except DataError as exc:
            fatal.append(str(exc))
        files["transactions"] = tx_report
        if tx_report.rows_in == 0 and not fatal:
            fatal.append(f"{tsource.path}: no transaction rows (header only)")

    lines = pd.concat(lines_parts, ignore_index=True) if lines_parts else _compact_empty()
    anonymous = pd.concat(anon_parts, ignore_index=True) if anon_parts else _compact_empty()
    transactions_read = tsource is not None and "transactions" in files and not any(
        str(tsource.path) in reason for reason in fatal)
    if transactions_read:
        lines, anonymous = _cross_row_rules(lines, anonymous, members_result, members_codes, receipts, tx_report,
                                            segments, quarantine_parts, problems, chunk_rows)
        _write_quarantine(quarantine_dir, tsource.path.name, quarantine_parts)
        if tx_report.accepted == 0 and not fatal:
            fatal.append(f"{tsource.path}: no accepted member transactions, nothing to train on")
        if not tx_report.balanced():
            raise AssertionError(f"row accounting does not balance: {tx_report.as_dict()}")
    size = _size_report(store_dir, meta, lines if transactions_read else None, members_codes, members_result,
                        store_id, warnings, fatal)
    usable = not fatal
    validation = StoreValidation(store_id, usable, files, problems[:MAX_PROBLEMS], warnings, fatal, size=size)
    if keep_data and usable:
        validation.lines = lines.assign(member=members_codes.index.to_numpy()[lines["member"].to_numpy()])
        validation.anonymous = anonymous
        validation.members = members_result.profiles
        validation.consent = members_result.consent
        validation.receipt_ids = receipts.index
    return validation


def _size_report(store_dir: Path, meta: dict, lines: pd.DataFrame | None, members_codes: Codes, members_result,
                 store_id: str, warnings: list[str], fatal: list[str]) -> dict:
    """The store's published size next to its members who can train (consenting, homed here,
    with accepted purchases): for the operator's eyes, never sent (DESIGN §4.1)."""
    try:
        published, source = declared_size(meta, {})
    except ValueError as exc:
        fatal.append(f"{store_dir / contract.STORE_JSON}: {exc}")
        return {}
    trainable = None
    if lines is not None and members_result is not None:
        ids = pd.unique(members_codes.index.to_numpy()[lines["member"].to_numpy()]) if len(lines) else []
        profiles = members_result.profiles
        home = (profiles.assign(_id=profiles["member_id"].str.strip()).set_index("_id")["home_store"]
                if "home_store" in profiles.columns else pd.Series(dtype=object))
        trainable = int(sum(contract.trains_here(home.get(m, ""), store_id) for m in ids))
    report = {"published_size": published, "source": source, "members_who_can_train": trainable,
              "suggested_published_size": bucket(trainable) if trainable else None}
    if published is None:
        warnings.append(f"{store_dir / contract.STORE_JSON}: no 'published_size': a deployed store will not train "
                        "with DP until it declares one (the size that sets the sampling rate, the noise and the "
                        f"FedAvg weight); suggested: \"published_size\": {report['suggested_published_size']}")
    elif trainable is not None and size_warning(trainable, published):
        warnings.append(f"{store_dir / contract.STORE_JSON}: {size_warning(trainable, published)}")
    return report


def _compact_empty() -> pd.DataFrame:
    return pd.DataFrame({"member": pd.Series(dtype=np.int64), "item": pd.Series(dtype=np.int64),
                         "day": pd.Series(dtype=float), "qty": pd.Series(dtype=float),
                         "receipt": pd.Series(dtype=np.int64), "row": pd.Series(dtype=np.int64),
                         "coupon": pd.Series(dtype=bool)})


def _compact(lines: pd.DataFrame, item_pos: pd.Index, receipts: Codes, members: Codes | None) -> pd.DataFrame:
    """Lines as integers and floats only: what bounded memory on large stores needs."""
    from common.data.dataset import days_since_epoch

    return pd.DataFrame({
        "member": (members.encode(lines["member"]) if members is not None else np.full(len(lines), -1)).astype(np.int32),
        "item": item_pos.get_indexer(lines["item_id"]).astype(np.int32),
        "day": days_since_epoch(lines["ts"]),
        "qty": lines["qty"].to_numpy(dtype=np.float32),  # POS quantities are small exact numbers
        "receipt": receipts.encode(lines["receipt"]).astype(np.int32),
        "row": lines["row"].to_numpy(dtype=np.int64),
        "coupon": lines["coupon"].to_numpy(dtype=bool) if "coupon" in lines.columns else np.zeros(len(lines), bool),
    })


def _cross_row_rules(lines, anonymous, members_result, members_codes, receipts, report, segments, quarantine_parts,
                     problems, chunk_rows):
    """Receipts with two timestamps (quarantined), members unknown or without consent
    (quarantined / excluded), anonymous lines (excluded), returns (netted, excluded)."""
    if len(segments) > 1:  # journal rows of a receipt the transactions file has: the journal's, set aside
        first = segments[1][1]
        ids = lambda f, journal: set(f.loc[(f["row"] > first) == journal, "receipt"].tolist())
        shared = (ids(lines, True) | ids(anonymous, True)) & (ids(lines, False) | ids(anonymous, False))
        if shared:
            hit = lambda f: f["receipt"].isin(shared).to_numpy() & (f["row"] > first).to_numpy()
            rows = np.concatenate([lines.loc[hit(lines), "row"].to_numpy(), anonymous.loc[hit(anonymous), "row"].to_numpy()])
            lines, anonymous = lines[~hit(lines)], anonymous[~hit(anonymous)]
            _quarantine_rows(segments, rows, "receipt_id_in_transactions", "receipt_id", report, quarantine_parts,
                             problems, chunk_rows)
    conflicts = receipt_conflicts([lines.rename(columns={"day": "ts"}), anonymous.rename(columns={"day": "ts"})])
    conflict_rows = np.array([], dtype=np.int64)
    if conflicts:
        conflict_rows = np.concatenate([lines.loc[lines["receipt"].isin(conflicts), "row"].to_numpy(),
                                        anonymous.loc[anonymous["receipt"].isin(conflicts), "row"].to_numpy()])
        lines = lines[~lines["receipt"].isin(conflicts)]
        anonymous = anonymous[~anonymous["receipt"].isin(conflicts)]
        _quarantine_rows(segments, conflict_rows, "receipt_ts_conflict", "ts", report, quarantine_parts, problems,
                         chunk_rows)
    report.add(report.excluded, "anonymous", len(anonymous))
    member_ids = members_codes.index.to_numpy()[lines["member"].to_numpy()] if len(lines) else np.array([], dtype=object)
    consent = members_result.consent if members_result is not None else pd.Series(dtype=bool)
    known = pd.Index(consent.index).get_indexer(member_ids) >= 0
    if (~known).any():
        _quarantine_rows(segments, lines.loc[~known, "row"].to_numpy(), "unknown_member", "member_id", report,
                         quarantine_parts, problems, chunk_rows)
    consenting = np.zeros(len(lines), dtype=bool)
    consenting[known] = consent.reindex(member_ids[known]).to_numpy(dtype=bool)
    report.add(report.excluded, "no_consent", int((known & ~consenting).sum()))
    lines = lines[consenting]
    netted, counts = net_returns(lines.rename(columns={"item": "item_id", "day": "ts"}))
    for reason, n in counts.items():
        report.add(report.excluded, reason, n)
    lines = netted.rename(columns={"item_id": "item", "ts": "day"})
    report.accepted = len(lines)
    anonymous = anonymous[anonymous["qty"] > 0]
    return lines, anonymous


def _quarantine_rows(segments, rows, reason, column, report, quarantine_parts, problems, chunk_rows):
    """Set aside rows found bad only after all rows were read: fetch their cells again."""
    wanted = set(int(r) for r in rows)
    report.add(report.quarantined, reason, len(wanted))
    for source, offset in segments:
        first = offset
        for chunk in read_chunks(source, chunk_rows):
            numbers = np.arange(offset + 1, offset + len(chunk) + 1)
            hit = np.isin(numbers, list(wanted))
            if hit.any():
                part = chunk[hit].drop(columns=[FIELDS_COLUMN], errors="ignore")
                part = part.assign(reason=reason, column=column, row=numbers[hit])
                quarantine_parts.append(part)
                for _, r in part.head(max(0, MAX_PROBLEMS - len(problems))).iterrows():
                    problems.append({"file": str(source.path), "row": int(r["row"]) - first, "column": column,
                                     "value": str(r.get(column, "")), "reason": reason})
            offset += len(chunk)


def prepare_store(store_dir: Path, catalog_dir: Path, cfg=None, *, now: pd.Timestamp | None = None,
                  quarantine_dir: Path | None = None, assume_consent: bool | None = None,
                  journal: Path | None = None):
    """Validate a store and build its training data: ``(StoreData, StoreValidation)``.

    Raises DataError when the store cannot train, with every reason.
    """
    from common.data.dataset import ExampleConfig, ItemIndex, build_store_data

    checked = validate_store(store_dir, catalog_dir, now=now, quarantine_dir=quarantine_dir,
                             assume_consent=assume_consent, journal=journal)
    if not checked.usable:
        raise DataError(f"store {checked.store_id} cannot train: " + "; ".join(checked.fatal))
    items = ItemIndex.from_catalog(read_catalog(catalog_dir))
    accounting = {name: report.as_dict() for name, report in checked.files.items()}
    try:
        data = build_store_data(checked.store_id, checked.lines, checked.anonymous, checked.members, items,
                                cfg or ExampleConfig(), accounting)
    except ValueError as exc:
        raise DataError(f"{store_dir}: {exc}") from None
    return data, checked
