"""The chain operator's commands: the SuperLink's certificates, the run-signing key, and
training runs started on a deployment."""

from __future__ import annotations

import os
import sys
from json import dumps
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.config import ConfigError
from common.exchange.keyfiles import writing

PANEL = "Chain operator"
# Only `--json` (as client.cli's; the operator's commands cannot import the store's).
Json = Annotated[bool, typer.Option("--json", help="print one JSON object")]
app = typer.Typer()

Out = Annotated[str, typer.Option("--out", help="directory to write (files that exist are never replaced)")]


@app.command(rich_help_panel=PANEL)
def certs(
    out: Out,
    host: Annotated[Optional[list[str]], typer.Option(
        "--host", help="a DNS name or IP address the SuperLink is reached at (repeat; loopback is always in)")] = None,
    days: Annotated[int, typer.Option("--days", help="validity in days")] = 365,
    json: Json = False,
) -> int:
    """A development CA and the SuperLink's TLS certificate.

    Writes ca.key, ca.crt, server.key and server.pem into --out, for trying the deployment. In
    production the chain's own PKI issues the SuperLink's certificate.
    """
    from server.certs import make_dev_pki

    paths = writing(out, lambda: make_dev_pki(Path(out), host or [], days=days))
    if json:
        print(dumps({k: str(v) for k, v in paths.items()}))
    else:
        print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


@app.command("operator-key", rich_help_panel=PANEL)
def operator_key(out: Out, json: Json = False) -> int:
    """The chain operator's run-signing key pair (ed25519).

    Writes OUT/operator.key (private, mode 0600, stays with whoever may start runs) and
    OUT/operator.pub (goes to every store: node config operator-public-key). Stores train only
    for runs signed with it.
    """
    from server.operator_key import make_operator_key

    private, public = writing(out, lambda: make_operator_key(Path(out)))
    if json:
        print(dumps({"private_key": str(private), "public_key": str(public)}))
    else:
        print(f"wrote {private} (stays with the operator: it authorizes runs) and {public} "
              "(every store's node config operator-public-key)")
    return 0


@app.command(rich_help_panel=PANEL)
def train(
    federation: Annotated[str, typer.Argument(metavar="FEDERATION", show_default=False)],
    run_config: Annotated[str, typer.Option(
        "--run-config", show_default=False, help="\"key=value key2='text' ...\" as for flwr run")] = "",
    operator_key: Annotated[Optional[str], typer.Option(
        "--operator-key", help="the operator's private key (default: $STOREFED_OPERATOR_KEY)")] = None,
    flwr_home: Annotated[Optional[str], typer.Option(
        "--flwr-home", help="the deployment's FLWR_HOME (default: $FLWR_HOME)")] = None,
    app: Annotated[Optional[str], typer.Option(
        "--app", help="the storefed app directory (default: this installation's)")] = None,
    valid_for_min: Annotated[float, typer.Option(
        "--valid-for-min", help="minutes within which the stores must first see the run")] = 60.0,
    json: Annotated[bool, typer.Option(
        "--json", help="print the results object (as storefed simulate --json)")] = False,
) -> int:
    """Sign a run with the operator key, start it on a deployment, wait.

    FEDERATION is the SuperLink connection in FLWR_HOME's config.toml. Signs the run config (the
    app's defaults with --run-config on top) with the operator key, starts it with
    'flwr run --stream', prints its lines and exits 0 only when Flower lists the run as
    finished:completed.
    """
    from datetime import timedelta

    from server.train import APP_DIR, OPERATOR_KEY_ENV, train as train_run

    key = operator_key or os.environ.get(OPERATOR_KEY_ENV)
    if not key:
        raise ConfigError(f"no operator key: pass --operator-key PATH or set {OPERATOR_KEY_ENV} "
                          "(make one with 'storefed operator-key --out DIR')")
    if not (0 < valid_for_min <= 7 * 24 * 60):
        raise ConfigError("--valid-for-min must be between 1 and 10080 (7 days)")
    code, results = train_run(federation, run_config, operator_key=Path(key),
                              flwr_home=Path(flwr_home) if flwr_home else None,
                              app=Path(app) if app else APP_DIR,
                              valid_for=timedelta(minutes=valid_for_min),
                              lines=sys.stderr if json else sys.stdout)
    if json and results is not None:
        print(dumps(results))
    return code


@app.command(rich_help_panel=PANEL)
def dashboard(
    runs: Annotated[Optional[list[str]], typer.Option(
        "--runs", help="a run's --out directory, a benchmark's results folder, or a folder of either "
        "(repeat; default: where storefed train writes, ~/.cache/storefed/runs)")] = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on (no sign-in: keep it loopback)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on")] = 8090,
) -> int:
    """The operator's dashboard: runs, rounds, stores and their privacy spend, benchmark reports.

    Pages in the browser, readable without JavaScript and without internet: the runs (when, who
    signed, strategy, stores, rounds, status, ε range), one run (quality per round, what each
    store did each round and why, each store's ε against its budget, the final model and who
    keeps it) and the benchmark reports. Runs until stopped (Ctrl-C).
    """
    from common.config import cache_root
    from common.data.storefiles import DataError
    from server.dashboard.app import serve_dashboard
    from server.dashboard.runs import RunsError

    try:
        serve_dashboard(runs or [cache_root() / "runs"], host, port, cache_file=cache_root() / "dashboard" / "index.json")
    except RunsError as exc:
        raise DataError(str(exc)) from None
    return 0
