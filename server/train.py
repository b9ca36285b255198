"""`storefed train FEDERATION`: sign a run with the operator key, start it with Flower, wait.

The run config the stores will see is the app's defaults (pyproject.toml) with the
operator's ``--run-config`` on top; that exact mapping, plus an expiry, a fresh nonce and
the SHA-256 of the FAB ``flwr run`` builds from the same directory, is signed
(common/privacy/run_signature.py) and the authorization keys travel as one more
``--run-config``. ``flwr run --stream`` exits 0 even when the run failed, so the verdict
is Flower's own record of the run (``flwr ls --format json``): exit 0 only for
``finished:completed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from common.config import ConfigError
from common.data.storefiles import DataError
from common.privacy import run_signature
BIN = Path(sys.executable).parent  # flwr and flower-superlink live next to python

OPERATOR_KEY_ENV = "STOREFED_OPERATOR_KEY"
APP_DIR = Path(__file__).resolve().parents[1]  # the storefed project this command belongs to
EXIT_FAILED = 1


def app_run_config(app: Path, overrides: str) -> dict[str, Any]:
    """The run config a store will see: the app's defaults with ``overrides`` parsed as Flower parses them."""
    from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

    try:
        project = tomllib.loads((app / "pyproject.toml").read_text())
        defaults = flatten_dict(project["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{app / 'pyproject.toml'}: not a Flower app's pyproject.toml ({exc}); pass --app DIR") from None
    try:
        given = flatten_dict(parse_config_args([overrides])) if overrides.strip() else {}
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--run-config {overrides!r}: {exc}; write it as \"key=value key2='text'\"") from None
    signing = sorted(set(given) & set(run_signature.AUTH_KEYS))
    if signing:
        raise ConfigError(f"--run-config sets {', '.join(signing)}: those are written by 'storefed train' itself")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"--run-config: unknown key(s) {', '.join(unknown)}")
    return fuse_dicts(defaults, given)


def fab_hash(app: Path) -> str:
    """SHA-256 of the FAB ``flwr run APP`` will build (Flower builds it deterministically)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def signed_overrides(config: dict[str, Any], key_path: Path, fab: str, valid_for: timedelta) -> str:
    """The authorization keys as one ``--run-config`` string."""
    from server.operator_key import load_operator_key

    added = run_signature.sign(config, load_operator_key(key_path), expires=datetime.now(timezone.utc) + valid_for,
                               nonce=secrets.token_hex(16), fab_hash=fab)
    return " ".join(f"{k}='{v}'" for k, v in sorted(added.items()))


def run_status(env: dict[str, str], federation: str, run_id: int) -> str:
    """Flower's status of a run, e.g. ``finished:completed``, from ``flwr ls --format json``."""
    res = subprocess.run([str(BIN / "flwr"), "ls", federation, "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=120)
    try:
        runs = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
    except (ValueError, KeyError):
        return f"unknown ({(res.stdout + res.stderr).strip()[-200:]})"
    return next((str(r["status"]) for r in runs if str(r["run-id"]) == str(run_id)), "unknown (not listed)")


def signed_run_config(run_config: str, *, operator_key: Path, app: Path = APP_DIR,
                      valid_for: timedelta = timedelta(hours=1)) -> list[str]:
    """The ``--run-config`` strings of a signed run: the operator's settings (with an out-dir
    added when none is given, for results.json) and the authorization keys."""
    app = Path(app).expanduser().resolve()
    config = app_run_config(app, run_config)
    if "out-dir" in config and not str(config["out-dir"]):
        out_dir = Path(tempfile.mkdtemp(prefix="storefed-run-"))  # where the ServerApp leaves results.json
        config["out-dir"] = str(out_dir)
        run_config = f"{run_config} out-dir='{out_dir}'"
    return [run_config.strip(), signed_overrides(config, operator_key, fab_hash(app), valid_for)]


def start_and_wait(federation: str, overrides: list[str], *, flwr_home: Path | None, app: Path = APP_DIR,
                   lines: TextIO = sys.stdout) -> tuple[int, dict | None]:
    """``flwr run APP FEDERATION --stream`` with ``overrides``; lines go to ``lines``; then
    Flower's verdict: (0, results.json's object) only for a run finished:completed."""
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if flwr_home:
        env["FLWR_HOME"] = str(flwr_home)
    argv = [str(BIN / "flwr"), "run", str(Path(app).expanduser().resolve()), federation, "--stream"]
    for override in overrides:
        argv += ["--run-config", override]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.write(line)
        lines.flush()
        found = re.search(r"Successfully started run (\d+)", line)
        if found and run_id is None:
            run_id = int(found.group(1))
    proc.wait()
    if run_id is None:
        print(f"storefed train: the run did not start (flwr run exited {proc.returncode})", file=sys.stderr)
        return EXIT_FAILED, None
    status = run_status(env, federation, run_id)
    lines.write(f"storefed train: run {run_id} {status}\n")
    if status != "finished:completed":
        return EXIT_FAILED, None
    given = str(parse_overrides(overrides).get("out-dir", ""))
    if not given:
        lines.write(f"storefed train: run {run_id} completed; it had no out-dir, so there is no results.json to read\n")
        return EXIT_FAILED, None
    out_dir = Path(given).expanduser()
    try:
        return 0, json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        lines.write(f"storefed train: run {run_id} completed but {out_dir / 'results.json'} is missing or unreadable\n")
        return EXIT_FAILED, None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    from flwr.common.config import flatten_dict, parse_config_args

    return flatten_dict(parse_config_args([o for o in overrides if o.strip()]))


def train(federation: str, run_config: str, *, operator_key: Path, flwr_home: Path | None, app: Path = APP_DIR,
          valid_for: timedelta = timedelta(hours=1), lines: TextIO = sys.stdout) -> tuple[int, dict | None]:
    """Sign and start a run, stream its lines to ``lines``, wait; (exit code, results or None)."""
    overrides = signed_run_config(run_config, operator_key=operator_key, app=app, valid_for=valid_for)
    # Not secret: it travels in clear to the server and every store; the log keeps what was authorized.
    lines.write(f"storefed train: authorization --run-config \"{overrides[-1]}\"\n")
    return start_and_wait(federation, overrides, flwr_home=flwr_home, app=app, lines=lines)
