"""Run configuration: every knob, its default and its type, in one place.

``pyproject.toml``'s ``[tool.flwr.app.config]`` must hold exactly these keys and values (a
test checks it), so ``flwr run .`` and the Python entry start from the same defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "stores": 20,
    "rounds": 10,
    "data-dir": "",  # empty: the generated chain for (seed, stores), made on demand
    "out-dir": "",  # empty: <cache>/runs/<run-name>
    "local-epochs": 1,
    "batch-size": 128,
    "lr": 0.01,
    "dp-optimizer": "sgd",
    "dp-lr": 2.0,
    "dim": 64,
    "hidden": 128,
    "history-len": 50,
    "test-days": 28,
    "dp": True,
    "target-epsilon": 8.0,  # per store over this run's planned rounds; sets σ when noise-multiplier is 0
    "epsilon-budget": 8.0,  # per store over all runs (the ledger); a store.json or node config may lower it
    "state-dir": "",  # empty: each store's <store-dir>/state; else <state-dir>/<store-id>
    "noise-multiplier": 0.0,
    "clip-norm": 1.0,
    "update-encoding": "float32",  # what a store sends: float32 weights, or its update as float16 / int8 (post-processing)
    "dp-path": "bookkeeping",  # DP-SGD arithmetic: bookkeeping (one backward pass) or opacus (ghost clipping); same mechanism
    "delta": 1e-6,
    "accountant": "prv",
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,  # 0: no evaluation round-trip (deployment: stores send no metrics by default)
    "strategy": "fedavg",  # fedavg fedavgm fedadam fedyogi fedprox fedmedian fedtrimmedavg krum multikrum
    "server-lr": 0.0,  # 0: Flower's default for the strategy (FedAvgM/FedAdam/FedYogi)
    "server-momentum": 0.9,  # FedAvgM
    "proximal-mu": 0.1,  # FedProx
    "trim-beta": 0.2,  # FedTrimmedAvg: fraction cut at each end
    "krum-malicious": 1,  # Krum/MultiKrum: stores assumed malicious
    "min-stores": 1,  # fewer acceptable updates than this: the round is skipped
    "update-norm-factor": 10.0,  # reject updates moving the model > this × the round's median (0: off)
    "checkpoint-dir": "",  # empty: <out-dir>/checkpoint
    "resume": False,
    "stop-after-round": 0,  # end the run after this round as if the server stopped (tests resume)
    "fault": "",  # simulation only: nan scale shape crash slow
    "fault-stores": 0,  # simulation only: the first K stores misbehave every round
    "fault-slow-s": 30.0,
    "node-wait-s": 60.0,
    "round-timeout-s": 3600.0,
    # The operator's authorization of a run (common/privacy/run_signature.py): written by
    # `storefed train`, checked by every deployed store; empty = unsigned.
    "run-signature": "",
    "run-expires": "",
    "run-nonce": "",
    "run-fab-hash": "",
    "operator-key-id": "",
}


def cache_root() -> Path:
    """Where generated chains and run results go: $STOREFED_CACHE or ~/.cache/storefed."""
    env = os.environ.get("STOREFED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "storefed"


def default_chain_dir(seed: int, stores: int) -> Path:
    return cache_root() / f"chain-seed{seed}-stores{stores}"


class ConfigError(ValueError):
    """A run config key or value that storefed does not accept."""


@dataclass(frozen=True)
class RunConfig:
    """The run configuration with defaults filled in and types checked."""

    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any] | None = None) -> "RunConfig":
        """Merge ``given`` over :data:`DEFAULTS`; unknown keys and wrong types are errors."""
        merged = dict(DEFAULTS)
        for key, value in (given or {}).items():
            if key not in DEFAULTS:
                raise ConfigError(f"unknown run config key '{key}'; known keys: {', '.join(DEFAULTS)}")
            want = type(DEFAULTS[key])
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"run config '{key}' must be {want.__name__}, got {value!r}")
            merged[key] = value
        return cls(merged)

    def chain_dir(self) -> Path:
        data = str(self["data-dir"])
        return Path(data).expanduser().resolve() if data else default_chain_dir(self["seed"], self["stores"])

    def generated(self) -> bool:
        """True when the chain is the generated default rather than given data."""
        return not str(self["data-dir"])
