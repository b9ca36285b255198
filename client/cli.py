"""The store's commands: check its files, serve its recommendations, read and repair its
privacy ledger, make its SuperNode key and run its daemon's executor."""

from __future__ import annotations

from json import dumps
from pathlib import Path
from typing import Annotated, Callable, Optional

import click
import typer

from common.config import ConfigError
from common.data.storefiles import DataError
from common.exchange.keyfiles import writing

PANEL = "Store"
# A user mistake (bad path, missing column, bad value): one line on stderr, then this code.
EXIT_USAGE = 2
# Only `--json`: typer would otherwise add a `--no-json` that the command line never had.
Json = Annotated[bool, typer.Option("--json", help="print one JSON object")]
app = typer.Typer()

StoreDir = Annotated[str, typer.Option("--store-dir", help="the store's data directory")]
StateDir = Annotated[Optional[str], typer.Option(
    "--state-dir", help="the store's state directory (default: <store-dir>/state)")]
Catalog = Annotated[Optional[str], typer.Option(
    "--catalog", help="the chain's catalog file (default: <store-dir>/../../catalog.csv)")]


@app.command(rich_help_panel=PANEL, epilog="Exit codes:\n\n0 usable, nothing quarantined\n\n"
             "1 usable, some rows quarantined\n\n2 unusable: the store cannot train (the report says why)")
def validate(
    store_dir: StoreDir,
    catalog: Catalog = None,
    state_dir: StateDir = None,
    assume_consent: Annotated[bool, typer.Option(
        "--assume-consent", help="members.csv has no consent column and consent is given otherwise")] = False,
    json: Json = False,
) -> int:
    """Check a store's files against the data contract.

    Checks a store directory (transactions and members, CSV or Parquet) row by row. Every row ends
    accepted, excluded (with a reason) or quarantined (written with its reason to
    <state>/quarantine/<file>).
    """
    from client.state.receipts_journal import journal_sources
    from common.data.ingest import validate_store

    store = Path(store_dir).expanduser().resolve()
    catalog_path = Path(catalog).expanduser().resolve() if catalog else store.parent.parent
    if not catalog_path.exists():
        raise DataError(f"{catalog_path}: catalog not found; pass --catalog FILE")
    state = Path(state_dir).expanduser().resolve() if state_dir else store / "state"
    quarantine = state / "quarantine"
    # The receipts journal of `storefed serve` is read as training reads it.
    checked = validate_store(store, catalog_path, quarantine_dir=quarantine, keep_data=False,
                             assume_consent=True if assume_consent else None, journal=journal_sources(state))
    report = checked.as_dict()
    report["quarantine_dir"] = str(quarantine)
    print(dumps(report) if json else render_validation(report))
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


# simulations/cli.py limits BLAS to one thread for this command before numpy loads.
@app.command(rich_help_panel=PANEL)
def serve(
    store_dir: StoreDir,
    catalog: Catalog = None,
    state_dir: StateDir = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback only by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8080,
    api_key_file: Annotated[Optional[str], typer.Option(
        "--api-key-file", metavar="FILE", help="a file holding the bearer key every request must carry (default: "
        "store.json serve_api_key_file, else serve_api_key); without a non-empty key serve does not start")] = None,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="answer without a key: only on a loopback --host, for trying it out")] = False,
) -> int:
    """The store's recommendation API (HTTP, FastAPI + uvicorn).

    Answers at the store: recommendations per member, audiences per item, and new receipts
    (journaled durably). Uses the model delivered to the store's state directory; OpenAPI docs
    at /docs. Every path needs the store's bearer key (exit 2 without one, unless --no-auth on
    loopback).
    """
    from client.serving.api import serve as serve_api

    store = Path(store_dir).expanduser().resolve()
    if not store.is_dir():
        raise DataError(f"{store}: store directory not found; pass the store's data directory as --store-dir")
    catalog_path = Path(catalog).expanduser().resolve() if catalog else None
    if catalog_path is not None and not catalog_path.exists():
        raise DataError(f"{catalog_path}: catalog not found; pass the chain's catalog file as --catalog")
    key_file = Path(api_key_file).expanduser() if api_key_file else None
    serve_api(store, catalog_path, host, port, Path(state_dir).expanduser() if state_dir else None,
              key_file=key_file, no_auth=no_auth)
    return 0


@app.command(rich_help_panel=PANEL)
def privacy(
    store_dir: StoreDir,
    state_dir: StateDir = None,
    accountant: Annotated[str, typer.Option(
        "--accountant", click_type=click.Choice(["prv", "rdp"]), help="how ε is computed")] = "prv",
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help="ε_max (default: store.json epsilon_budget, else 8)")] = None,
    json: Json = False,
    clear_reservation: Annotated[Optional[str], typer.Option(
        "--clear-reservation", metavar="ID", help="release the open reservation ID left by a run that crashed "
        "(it counts as spent until then); prints what it releases and how the spend changes")] = None,
    repair: Annotated[bool, typer.Option(
        "--repair", help="rewrite a ledger that is cut short, altered or missing from its intact records, adding "
        "lost-spend events so the spend stays at least what its head recorded")] = False,
    accept_ledger: Annotated[bool, typer.Option(
        "--accept-ledger", help="rebuild a missing head file from the ledger as it stands (only if you know no "
        "records were lost)")] = False,
    from_backup: Annotated[Optional[str], typer.Option(
        "--from-backup", metavar="FILE", help="with --repair: take the intact records from this copy of the "
        "ledger instead")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> int:
    """A store's privacy spent: ε over its whole ledger.

    Reads the store's privacy ledger (every training round of every run) and prints ε spent, δ,
    the budget, rounds left at the current settings and the events, and lists open reservations.
    Exit 2 when the ledger is unreadable, cut short, altered or missing (the message names the
    file); --repair, --accept-ledger and --clear-reservation (one at a time) are the operator's
    answers.
    """
    from client.state import privacy_report as pr

    given = [flag for flag, value in (("--clear-reservation", clear_reservation is not None), ("--repair", repair),
                                      ("--accept-ledger", accept_ledger)) if value]
    if len(given) > 1:  # one answer at a time, as argparse's mutually exclusive group enforced
        raise click.UsageError(f"argument {given[1]}: not allowed with argument {given[0]}")
    if from_backup and not repair:
        raise ConfigError("--from-backup goes with --repair")
    store, state = Path(store_dir), Path(state_dir) if state_dir else None
    action: Callable[[Callable[[str], bool]], tuple[bool, str]] | None = None
    if clear_reservation:
        action = lambda c: pr.clear_reservation(store, state, clear_reservation, c, accountant)
    elif repair:
        action = lambda c: pr.repair(store, state, c, Path(from_backup) if from_backup else None, accountant)
    elif accept_ledger:
        action = lambda c: pr.accept_ledger(store, state, c, accountant)
    if action is not None:
        done, what = action(_confirm(yes))
        print(what)
        return 0 if done else 1
    report = pr.privacy_report(store, state, accountant=accountant, budget=budget)
    print(dumps(report) if json else pr.render_privacy(report))
    return 0


def _confirm(yes: bool) -> Callable[[str], bool]:
    """Ask on the terminal unless --yes; no terminal answer (EOF) means no."""
    def confirm(question: str) -> bool:
        print(question)
        if yes:
            return True
        try:
            return input("[y/N] ").strip().lower() in ("y", "yes")
        except EOFError:
            return False
    return confirm


@app.command("node-key", rich_help_panel=PANEL)
def node_key(
    out: Annotated[str, typer.Option("--out", help="directory to write")],
    name: Annotated[str, typer.Option("--name", help="file name, e.g. the store id")],
    json: Json = False,
) -> int:
    """A store's SuperNode key pair (for node authentication).

    Writes OUT/NAME (private key, mode 0600, stays at the store) and OUT/NAME.pub (register it
    with 'flwr supernode register').
    """
    from client.daemon.node_key import make_node_key

    private, public = writing(out, lambda: make_node_key(Path(out), name))
    if json:
        print(dumps({"private_key": str(private), "public_key": str(public)}))
    else:
        print(f"wrote {private} (stays at the store) and {public} (register it at the SuperLink)")
    return 0


@app.command("store-exec", rich_help_panel=PANEL)
def store_exec(
    runtime_api_address: Annotated[str, typer.Option(
        "--runtime-api-address", help="the SuperNode's Runtime API (host:port)")],
) -> int:
    """A store daemon's executor: the installed storefed answers its SuperNode's tasks.

    Answers with the storefed ClientApp installed at the store, never with a run's code.
    """
    from client.daemon.pinned_exec import main as store_exec_main

    return store_exec_main(["--runtime-api-address", runtime_api_address])
