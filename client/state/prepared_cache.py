"""Prepared store data on disk, for simulation: validate and build a store's arrays once.

In a simulation every store may be served by any worker process (Ray actor), so each
worker would validate and prepare every store again (the largest cost of a simulation's
first round). The first worker pickles the prepared data under ``<cache>/prepared/``; the
others load it (``$STOREFED_PREPARED_DIR`` moves the directory). The key covers the store's and the catalog's files (path, size, mtime), the
example settings, consent, and the source of the code that prepares data, so a change to
any of them prepares afresh. Deployed stores do not use it (one process per store).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

from common.config import cache_root
from common.data.dataset import ExampleConfig, StoreData
from common.data.storefiles import atomic_write_bytes

_CODE = ("dataset.py", "ingest.py", "validation.py", "contract.py")


def _fingerprint(path: Path) -> str:
    files = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else [Path(path)]
    return "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files if p.exists())


def path(store_dir: Path, catalog_dir: Path, ex_cfg: ExampleConfig, assume_consent: bool) -> Path:
    """Where the prepared data of this store, under these settings, is kept."""
    common_dir = Path(__file__).resolve().parents[2] / "common" / "data"
    h = hashlib.sha256()
    for part in (str(Path(store_dir).resolve()), _fingerprint(store_dir), str(Path(catalog_dir).resolve()),
                 _fingerprint(catalog_dir), repr(ex_cfg), repr(assume_consent)):
        h.update(part.encode() + b"\0")
    for name in _CODE:
        h.update((common_dir / name).read_bytes())
    root = Path(os.environ["STOREFED_PREPARED_DIR"]) if os.environ.get("STOREFED_PREPARED_DIR") else cache_root() / "prepared"
    return root / f"{h.hexdigest()[:32]}.pkl"


def load(file: Path) -> StoreData | None:
    """The cached data, or None when absent or unreadable."""
    try:
        with open(file, "rb") as fh:
            data = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None
    return data if isinstance(data, StoreData) else None


def save(file: Path, data: StoreData) -> None:
    atomic_write_bytes(file, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
