"""Mutation testing of the privacy- and aggregation-critical modules, module by module.

    nice -n 19 python -m simulations.mutation            # run, then print the table
    python -m simulations.mutation --table-only          # the table of the last run
    python -m simulations.mutation --module accountant   # one module (repeatable)

Runs mutmut (configured in pyproject.toml, ``[tool.mutmut]``: which files are mutated and
which fast tests run) from the project root over the chosen modules' mutants (each mutant
runs only the selected tests that reach its function), then reads ``mutmut results --all true``. Only the
Poisson sampler and the numbers that set it are counted for common/learning/training.py
(the rest of that file is local training, covered elsewhere). A mutant that times out counts
as killed; one that no selected test reaches ("no tests") counts as a survivor.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter

# module name → (mutant-name glob, the functions of it that are counted; None = all)
MODULES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "accountant": ("common.privacy.accountant.*", None),
    "ledger": ("common.privacy.ledger.*", None),
    "store_policy": ("common.privacy.store_policy.*", None),
    "run_signature": ("common.privacy.run_signature.*", None),
    "published_size": ("common.privacy.published_size.*", None),
    "secure_noise": ("common.privacy.secure_noise.*", None),
    "dp_fast": ("common.learning.dp_fast.*", None),
    "training (sampler)": ("common.learning.training.*",
                           ("x_steps_per_epoch", "x_sample_rate_for", "x_expected_batch", "xǁPoissonBatchesǁ")),
    "wire": ("common.exchange.wire.*", None),
    "update_checks": ("common.exchange.update_checks.*", None),
    "strategy": ("server.strategy.*", None),
}
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
_LINE = re.compile(r"^\s+(\S+): (.+)$")


def statuses() -> dict[str, str]:
    """Every mutant's status from the last runs (``mutmut results --all true``)."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    return {m.group(1): m.group(2).strip() for m in map(_LINE.match, out.splitlines()) if m}


def counted(name: str, module: str) -> bool:
    glob, functions = MODULES[module]
    if not name.startswith(glob[:-1]):
        return False
    local = name[len(glob) - 1:]
    return functions is None or local.startswith(functions)


def table(status: dict[str, str]) -> tuple[list[dict], dict[str, list[str]]]:
    rows, survivors = [], {}
    for module in MODULES:
        mine = {k: v for k, v in status.items() if counted(k, module)}
        checked = {k: v for k, v in mine.items() if v not in ("not checked", "skipped")}
        c = Counter("killed" if v in KILLED else "survived" for v in checked.values())
        survivors[module] = sorted(k for k, v in checked.items() if v not in KILLED)
        rows.append({"module": module, "mutants": len(mine), "checked": len(checked), "killed": c["killed"],
                     "survived": c["survived"],
                     "score": round(100.0 * c["killed"] / len(checked), 1) if checked else None})
    return rows, survivors


def markdown(rows: list[dict]) -> str:
    lines = ["| module | mutants | checked | killed | survived | score |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        score = "–" if r["score"] is None else f"{r['score']:.1f} %"
        lines.append(f"| {r['module']} | {r['mutants']} | {r['checked']} | {r['killed']} | {r['survived']} | {score} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=list(MODULES), help="only these modules")
    parser.add_argument("--table-only", action="store_true", help="print the last run's table, run nothing")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--json", help="also write the table and the survivors to this file")
    args = parser.parse_args(argv)
    if not args.table_only:
        globs = [MODULES[m][0] for m in args.module or list(MODULES)]
        subprocess.run(["mutmut", "run", "--max-children", str(args.max_children), *globs], check=False,
                       stdout=subprocess.DEVNULL)
    rows, survivors = table(statuses())
    if args.module:
        rows = [r for r in rows if r["module"] in args.module]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "survivors": survivors}, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
