"""The systemd units in the repo start Flower with flags Flower 1.41 accepts, TLS and node auth on."""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

ROOT = Path(__file__).resolve().parents[1]


def _exec_start(unit: Path, instance: str = "", env: dict[str, str] | None = None) -> list[str]:
    """The ExecStart command line as systemd would run it (continuations joined, %i and ${VAR} filled in)."""
    text = unit.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    line = line[len("ExecStart="):].replace("%i", instance)
    for key, value in (env or {}).items():
        line = line.replace("${" + key + "}", value)
    assert "${" not in line, f"unset variable in {unit.name}: {line}"
    return shlex.split(line)


def _env_example() -> dict[str, str]:
    lines = (ROOT / "client" / "deploy" / "supernode.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_the_superlink_unit_runs_with_tls_node_authentication_and_a_database():
    argv = _exec_start(ROOT / "server" / "deploy" / "storefed-superlink.service")
    assert argv[0].endswith("/flower-superlink")
    args = _parse_args_run_superlink().parse_args(argv[1:])
    assert args.enable_supernode_auth and not args.insecure
    assert args.ssl_ca_certfile and args.ssl_certfile and args.ssl_keyfile
    assert args.database.endswith(".db")  # registered stores and runs survive a restart


def test_the_supernode_unit_runs_with_tls_its_key_and_its_store():
    unit = ROOT / "client" / "deploy" / "storefed-supernode@.service"
    argv = _exec_start(unit, "S001", _env_example())
    assert argv[0].endswith("/flower-supernode")
    args = _parse_args_run_supernode().parse_args(argv[1:])
    assert not args.insecure and args.root_certificates
    assert args.auth_supernode_private_key == "/etc/storefed/keys/S001"
    assert parse_config_args([args.node_config]) == {"store-dir": "/srv/storefed/stores/S001",
                                                     "operator-public-key": "/etc/storefed/operator.pub"}
    # It runs no ClientApp itself (not a run's, not Flower's flwr-clientapp): storefed's executor does.
    assert args.isolation == "process" and args.host == "127.0.0.1"
    # The ledger directory the daemon may write is the one under its store directory.
    assert "ReadWritePaths=/var/lib/storefed/%i /srv/storefed/stores/%i/state" in unit.read_text()


def test_the_serve_unit_runs_storefed_serve_on_loopback_for_its_store():
    from simulations.cli import build_parser

    unit = ROOT / "client" / "deploy" / "storefed-serve@.service"
    argv = _exec_start(unit, "S001")
    assert argv[0].endswith("/storefed")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.store_dir == "/srv/storefed/stores/S001"
    assert args.host == "127.0.0.1" and args.port == 8080
    assert not args.no_auth and args.api_key_file is None  # the key comes from store.json; never open
    # It writes only the state directory (the receipts journal).
    assert "ReadWritePaths=/srv/storefed/stores/%i/state" in unit.read_text()


def test_the_store_executor_unit_answers_its_supernode_with_the_installed_code():
    from simulations.cli import build_parser

    unit = ROOT / "client" / "deploy" / "storefed-store-exec@.service"
    env = _env_example()
    argv = _exec_start(unit, "S001", env)
    assert argv[0] == "/opt/storefed/venv/bin/storefed"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "store-exec" and args.runtime_api_address == f"127.0.0.1:{env['RUNTIME_PORT']}"
    supernode = _parse_args_run_supernode().parse_args(
        _exec_start(ROOT / "client" / "deploy" / "storefed-supernode@.service", "S001", env)[1:])
    assert supernode.port == int(env["RUNTIME_PORT"])  # the same Runtime API
    text = unit.read_text()
    assert "BindsTo=storefed-supernode@%i.service" in text
    assert "ReadWritePaths=/srv/storefed/stores/%i/state" in text
