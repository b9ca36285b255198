"""Mutation testing of the privacy- and aggregation-critical modules, module by module.

    nice -n 19 python -m simulations.bench.mutation            # run, then print the table
    python -m simulations.bench.mutation --table-only          # the table of the last run
    python -m simulations.bench.mutation --module accountant   # one module (repeatable)
    nice -n 19 python -m simulations.bench.mutation --sample 30 --json before.json
    nice -n 19 python -m simulations.bench.mutation --rerun-survivors before.json --json after.json

Runs mutmut (configured in pyproject.toml, ``[tool.mutmut]``: which files are mutated and
which fast tests run) from the project root over the chosen modules' mutants (each mutant
runs only the selected tests that reach its function), then reads ``mutmut results --all true``. Only the
Poisson sampler is counted for common/learning/training.py (the rest of that file is local
training, covered elsewhere; the numbers that set the sampler, q, steps and the divisor,
are the accountant's). A mutant that times out counts
as killed; one that no selected test reaches ("no tests") counts as a survivor.

``--direct`` runs the chosen mutants without ``mutmut run``'s per-run set-up (its stats and
clean-test passes take minutes on a loaded 2-core machine): each mutant is one pytest process
in ``mutants/`` with ``MUTANT_UNDER_TEST`` set (mutmut's own switch), on the selected tests
that mutmut recorded as reaching the mutated function (``mutants/mutmut-stats.json``); a
``mutmut run`` must have made ``mutants/`` first.

``--sample N`` checks, per module of more than N mutants, N of them drawn at random (seed
``--seed``) from every mutant of the module, and all of a smaller module's; the table then
counts the sample. ``--rerun-survivors FILE`` runs again only the survivors that FILE (a
``--json`` of an earlier run) lists, the same way as ``--direct`` but on the module's
``tests/test_mut_<module>.py`` (the old tests already let them live), and counts the earlier
run's other verdicts as they were: a mutant the old tests killed stays killed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import os
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

# module name → (mutant-name glob, the functions of it that are counted; None = all)
MODULES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "accountant": ("common.privacy.accountant.*", None),
    "ledger": ("common.privacy.ledger.*", None),
    "store_policy": ("client.store_policy.*", None),
    "run_signature": ("common.privacy.run_signature.*", None),
    "published_size": ("common.privacy.published_size.*", None),
    "secure_noise": ("common.privacy.secure_noise.*", None),
    "dp_fast": ("common.learning.dp_fast.*", None),
    "training (sampler)": ("common.learning.training.*",
                           ("xǁPoissonBatchesǁ",)),
    "wire": ("common.exchange.wire.*", None),
    "update_checks": ("server.update_checks.*", None),
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


def sample(names: list[str], size: int, seed: int) -> set[str]:
    """Per module, ``size`` of its counted mutants at random (all of them when it has fewer)."""
    rng, chosen = random.Random(seed), set()
    for module in MODULES:
        mine = sorted(n for n in names if counted(n, module))
        chosen |= set(mine if len(mine) <= size else rng.sample(mine, size))
    return chosen


TEST_FILE = {m: f"tests/test_mut_{m.split()[0]}.py" for m in MODULES}
_FUNCTION = re.compile(r"__mutmut_\d+$")


def module_of(name: str) -> str | None:
    return next((m for m in MODULES if counted(name, m)), None)


def run_direct(names: list[str], tests_for, jobs: int, timeout_s: float = 300.0) -> dict[str, str]:
    """Each mutant in its own pytest process in mutants/, with mutmut's MUTANT_UNDER_TEST set."""
    shutil.copytree("tests", os.path.join("mutants", "tests"), dirs_exist_ok=True)

    def one(name: str) -> tuple[str, str]:
        tests = tests_for(name)
        if not tests:
            return name, "no tests"
        env = {**os.environ, "MUTANT_UNDER_TEST": name}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
        try:
            code = subprocess.run(cmd, cwd="mutants", env=env, capture_output=True, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return name, "timeout"
        verdict = {0: "survived", 1: "killed", 5: "no tests"}.get(code, "suspicious")
        print(f"{verdict:9s} {name}", file=sys.stderr, flush=True)
        return name, verdict

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, interleaved(names)))


def interleaved(names: list[str]) -> list[str]:
    """Round-robin over the modules in a seeded random order, so that a run stopped early has
    checked a random part of every module rather than all of a few."""
    rng, queues = random.Random(0), {}
    for name in sorted(names):
        queues.setdefault(module_of(name), []).append(name)
    for queue in queues.values():
        rng.shuffle(queue)
    return [q[i] for i in range(max(map(len, queues.values()), default=0)) for q in queues.values() if i < len(q)]


def _selected() -> tuple[list[str], set[str]]:
    """The test files of pyproject's [tool.mutmut] selection and the tests it deselects."""
    import tomllib

    with open("pyproject.toml", "rb") as f:
        cfg = tomllib.load(f)["tool"]["mutmut"]
    args = cfg.get("pytest_add_cli_args", [])
    return cfg["pytest_add_cli_args_test_selection"], {b for a, b in zip(args, args[1:]) if a == "--deselect"}


def run_in_process(names: list[str], tests_for, timeout_s: int = 120) -> dict[str, str]:
    """Like :func:`run_direct`, but every mutant in this one process (pytest.main again per
    mutant, MUTANT_UNDER_TEST switched in between): no interpreter start per mutant."""
    import signal

    import pytest

    shutil.copytree("tests", os.path.join("mutants", "tests"), dirs_exist_ok=True)
    os.chdir("mutants")
    sys.path.insert(0, os.getcwd())

    def alarm(*_):
        raise TimeoutError("mutant timed out")

    signal.signal(signal.SIGALRM, alarm)
    out = {}
    for name in interleaved(names):
        tests = tests_for(name)
        if not tests:
            out[name] = "no tests"
            continue
        os.environ["MUTANT_UNDER_TEST"] = name
        signal.alarm(timeout_s)
        try:
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]))
        except TimeoutError:
            code = 36
        finally:
            signal.alarm(0)
        out[name] = {0: "survived", 1: "killed", 5: "no tests", 36: "timeout"}.get(code, "suspicious")
        print(f"{out[name]:9s} {name}", file=sys.stderr, flush=True)
    os.environ.pop("MUTANT_UNDER_TEST", None)
    os.chdir("..")
    return out


def recorded_tests(name: str) -> list[str]:
    """The selected tests that mutmut recorded as reaching the mutant's function."""
    with open(os.path.join("mutants", "mutmut-stats.json"), encoding="utf-8") as f:
        reach = json.load(f)["tests_by_mangled_function_name"]
    files, left_out = _selected()
    return sorted(t for t in reach.get(_FUNCTION.sub("", name), [])
                  if t.split("::")[0] in files and t not in left_out)


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
    parser.add_argument("--json", help="also write the table, the survivors and every verdict to this file")
    parser.add_argument("--sample", type=int, help="check at most this many mutants per module, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--rerun-survivors", metavar="FILE", help="run only the survivors of an earlier --json")
    parser.add_argument("--direct", action="store_true", help="one pytest process per mutant, not `mutmut run`")
    parser.add_argument("--in-process", action="store_true",
                        help="with --direct or --rerun-survivors: every mutant in this one process")
    args = parser.parse_args(argv)
    earlier = None
    if args.rerun_survivors:
        with open(args.rerun_survivors, encoding="utf-8") as f:
            earlier = json.load(f)["status"]
    direct: dict[str, str] = {}
    if not args.table_only:
        if earlier is not None:
            names = sorted(k for k, v in earlier.items() if v not in KILLED and v not in ("not checked", "skipped"))
        elif args.sample:
            known = statuses()  # mutants/ must exist: a first `mutmut run` makes it
            names = sorted(k for k in sample(list(known), args.sample, args.seed) if known[k] == "not checked")
        else:
            names = [MODULES[m][0] for m in args.module or list(MODULES)]
        new_tests = lambda n: [TEST_FILE[module_of(n)]]  # noqa: E731
        if args.in_process and (earlier is not None or args.direct):
            recorded = {n: recorded_tests(n) for n in names} if earlier is None else None
            direct = run_in_process(names, new_tests if earlier is not None else recorded.get)
        elif earlier is not None:
            direct = run_direct(names, new_tests, args.max_children)
        elif args.direct:
            direct = run_direct(names, recorded_tests, args.max_children)
        else:
            subprocess.run(["mutmut", "run", "--max-children", str(args.max_children), *names], check=False,
                           stdout=subprocess.DEVNULL)
    if earlier is not None:
        status = {**earlier, **direct}
    else:
        status = {**statuses(), **direct}
        if args.sample:
            keep = sample(list(status), args.sample, args.seed)
            status = {k: v for k, v in status.items() if k in keep}
    rows, survivors = table(status)
    if args.module:
        rows = [r for r in rows if r["module"] in args.module]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "survivors": survivors, "status": status}, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
