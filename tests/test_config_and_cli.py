"""Run config defaults, the `storefed` CLI's errors, and what a store may send."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from common.exchange import wire
from common.config import DEFAULTS, ConfigError, RunConfig
from simulations.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_holds_every_knob_with_the_same_default():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == DEFAULTS


def test_run_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown run config key 'roundz'"):
        RunConfig.from_mapping({"roundz": 3})
    with pytest.raises(ConfigError, match="'rounds' must be int"):
        RunConfig.from_mapping({"rounds": "3"})
    assert RunConfig.from_mapping({"lr": 1})["lr"] == 1.0


def test_missing_data_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["simulate", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: data directory not found" in err


def test_missing_required_column_names_file_and_column(small_chain_dir, tmp_path, capsys):
    import shutil

    chain = tmp_path / "chain"
    shutil.copytree(small_chain_dir, chain)
    tx = chain / "stores" / "S002" / "transactions.csv"
    lines = tx.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("quantity")
    tx.write_text("\n".join(",".join(c for i, c in enumerate(l.split(",")) if i != col) for l in lines) + "\n")
    assert main(["simulate", "--data", str(chain)]) == 2
    err = capsys.readouterr().err
    assert "S002/transactions.csv" in err and "'quantity'" in err and "Traceback" not in err


def test_cli_runs_as_a_console_script_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--data", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_designed_reply_values_are_the_ones_design_lists():
    # DESIGN §4.3 lists these; a new key in common/exchange/wire.py must be added there first.
    assert set(wire.TRAIN_METRICS) == {"num-examples", "epsilon", "delta", "noise-multiplier",
                                       "rounds-trained", "epsilon-budget", "train-loss"}
    assert set(wire.TRAIN_CONFIG) == {"store-id", "accountant"}
    assert set(wire.DECLINE_KEYS) == {"store-id", "epsilon", "epsilon-after", "epsilon-budget", "delta",
                                      "accountant", "reason"}
    assert set(wire.EVAL_CONFIG) == {"store-id"}
    assert set(wire.REFUSE_KEYS) == {"store-id", "reason"}
