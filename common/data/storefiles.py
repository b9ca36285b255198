"""Reading and writing chain files (DESIGN §3): the I/O edge of ``common``.

Everything here either writes atomically (temp file, fsync, rename) or reads a file and
raises :class:`DataError` naming the file and column when it does not fit the contract.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd

from common.data import contract
from common.data.synth import ChainSpec, GeneratedChain


class DataError(Exception):
    """A store or chain file that cannot be used; the message says which and what to do."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (a new or renamed file in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False, lineterminator="\n").encode("utf-8")


def write_chain(chain: GeneratedChain, out: Path) -> None:
    """Write a generated chain to ``out`` as DESIGN §3 files.

    The chain is written into a sibling temp directory and renamed into place, so a crash
    never leaves a half-written chain behind; an existing ``out`` is replaced.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (tmp / contract.CATALOG_FILE).write_bytes(_csv_bytes(chain.catalog))
        for store in chain.stores:
            sdir = tmp / contract.STORES_DIR / store.store_id
            sdir.mkdir(parents=True)
            (sdir / contract.STORE_JSON).write_text(json.dumps(store.meta, indent=2) + "\n")
            (sdir / contract.TRANSACTIONS_FILE).write_bytes(_csv_bytes(store.transactions))
            (sdir / contract.MEMBERS_FILE).write_bytes(_csv_bytes(store.members))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def locate(directory: Path, csv_name: str) -> Path | None:
    """The CSV file, or a Parquet file of the same stem, or None."""
    path = Path(directory) / csv_name
    if path.exists():
        return path
    parquet = path.with_suffix(".parquet")
    return parquet if parquet.exists() else None


def _find(directory: Path, csv_name: str) -> Path:
    """Like :func:`locate`, but a missing file is an error that says what to do."""
    found = locate(directory, csv_name)
    if found is None:
        path = Path(directory) / csv_name
        raise DataError(f"{path}: file not found (expected {csv_name} or {path.with_suffix('.parquet').name}); "
                        f"check the directory or run 'storefed generate'")
    return found


def read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read one contract table as strings, checking that the required columns exist."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path).astype("string")
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot be read as a table ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); export it as UTF-8 CSV "
                        f"or Parquet and run 'storefed validate'") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    for col in required:
        if col not in frame.columns:
            raise DataError(f"{path}: required column '{col}' is missing (columns found: "
                            f"{', '.join(frame.columns) or 'none'}); add it as DESIGN §3 describes")
    return frame.fillna("")


def read_catalog(source: Path) -> pd.DataFrame:
    """The chain catalog with one row per unique item_id; ``source`` is the file or the chain dir."""
    source = Path(source)
    path = source if source.is_file() else _find(source, contract.CATALOG_FILE)
    frame = read_table(path, contract.CATALOG_REQUIRED)
    dup = frame["item_id"].duplicated()
    if dup.any():
        row = int(dup.to_numpy().argmax()) + 2  # +1 header, +1 one-based
        raise DataError(f"{path}: row {row}, column 'item_id': duplicate item "
                        f"'{frame['item_id'][dup].iloc[0]}'; item ids must be unique")
    for col in contract.CATALOG_COLUMNS:
        if col not in frame.columns:
            frame[col] = ""
    return frame.reset_index(drop=True)


def read_store_meta(store_dir: Path) -> dict:
    """store.json as a dict; ``store_id`` defaults to the directory name."""
    path = Path(store_dir) / contract.STORE_JSON
    if not path.exists():
        return {"store_id": Path(store_dir).name}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); fix the file") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object with at least 'store_id'")
    meta.setdefault("store_id", Path(store_dir).name)
    return meta


def store_dirs(chain_dir: Path) -> list[Path]:
    """Store directories of a chain, sorted by name."""
    root = Path(chain_dir) / contract.STORES_DIR
    if not root.is_dir():
        raise DataError(f"{root}: no 'stores' directory; run 'storefed generate --out {chain_dir}'")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: holds no store directories")
    return dirs


def build_once(out: Path, build: Callable[[Path], dict]) -> bool:
    """Run ``build(out)`` unless ``out`` holds a complete build already (its ``.complete``
    marker, written last with what ``build`` returns).

    Safe when many processes ask at once: a file lock beside ``out``; ``build`` is expected to
    make ``out`` appear by rename. Returns True when this call built it.
    """
    import fcntl

    out = Path(out)
    marker = out / ".complete"
    if marker.exists():
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return False
        atomic_write_text(marker, json.dumps(build(out)) + "\n")
        return True


def ensure_generated_chain(out: Path, spec: ChainSpec) -> bool:
    """Generate the chain ``spec`` into ``out`` unless a complete one is there already
    (:func:`build_once`). Returns True when this call generated it."""
    from common.data.synth import generate_chain

    def build(path: Path) -> dict:
        write_chain(generate_chain(spec), path)
        return {"seed": spec.seed, "stores": spec.stores}

    return build_once(out, build)
