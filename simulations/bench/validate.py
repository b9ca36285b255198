"""`storefed bench validate`: validation throughput and peak memory on a large store.

Builds a store of ``lines`` transaction lines by repeating a generated store's receipts
(fresh receipt ids, shifted dates), then validates it in a child process so that the peak
RSS measured is the validator's own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def build_large_store(root: Path, lines: int, seed: int = 0) -> Path:
    """A chain directory with one store of about ``lines`` transaction lines."""
    from common.data.storefiles import write_chain
    from common.data.synth import ChainSpec, generate_chain

    chain = generate_chain(ChainSpec(stores=1, members=3000, seed=seed))
    write_chain(chain, root)
    store = root / "stores" / chain.stores[0].store_id
    base = chain.stores[0].transactions
    copies = max(1, -(-lines // len(base)))
    path = store / "transactions.csv"
    with open(path, "w", encoding="utf-8") as fh:
        base.head(0).to_csv(fh, index=False, lineterminator="\n")
        written = 0
        for copy in range(copies):
            part = base.iloc[: min(len(base), lines - written)].copy()
            part["receipt_id"] = part["receipt_id"] + f"-{copy}"
            # Each copy is a week earlier, so nothing lands in the future.
            part["ts"] = (pd.to_datetime(part["ts"]) - pd.Timedelta(days=7 * copy)).dt.strftime("%Y-%m-%dT%H:%M:%S")
            part.to_csv(fh, index=False, header=False, lineterminator="\n")
            written += len(part)
    return store


def _child(store: str, catalog: str) -> None:
    from common.data.ingest import validate_store

    start = time.perf_counter()
    result = validate_store(Path(store), Path(catalog), keep_data=False)
    seconds = time.perf_counter() - start
    rows = result.files["transactions"].rows_in + result.files["members"].rows_in
    print(json.dumps({"seconds": seconds, "rows": rows, "usable": result.usable,
                      "transactions": result.files["transactions"].as_dict()}))


def bench_validate(lines: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="storefed-bench-") as tmp:
        store = build_large_store(Path(tmp) / "chain", lines)
        size_mb = (store / "transactions.csv").stat().st_size / 2**20
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-c", "import sys; from simulations.bench.validate import _child; "
                               "_child(sys.argv[1], sys.argv[2])", str(store), str(Path(tmp) / "chain")],
                              capture_output=True, text=True, check=True)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"lines": out["transactions"]["rows_in"], "file_mb": round(size_mb, 1), "seconds": round(out["seconds"], 2),
            "rows_per_s": round(out["rows"] / out["seconds"]), "peak_rss_mb": round(max(peak_kb, before) / 1024, 1),
            "usable": out["usable"], "transactions": out["transactions"]}
