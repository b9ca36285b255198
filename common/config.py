"""Run configuration: every knob, its default and its type, in one place.

``pyproject.toml``'s ``[tool.flwr.app.config]`` must hold exactly these keys and values (a
test checks it), so ``flwr run .`` and the Python entry start from the same defaults.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# The noise multipliers storefed runs with, configured or calibrated
# (common.privacy.accountant searches in this range too). Below 0.3 Opacus' PRV
# accountant's numerics need more memory than a store has (σ = 0.01, 20 steps at q = 0.5:
# killed; σ = 0.1, 100 steps at q = 1: over 4 GB), so a run could take a store down by asking
# for it, and such σ protect no one (σ = 0.3: ε 20.8 for one full-batch step). Above 100 a
# PRV evaluation slows down (σ = 10⁶: 80 s) for an ε indistinguishable from 0.
MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 100.0

# dp-train = heads: these layers are frozen under DP-SGD. At ε 1 their run SNR is 0.02–0.26
# (simulations/results/dp-design/report.md): trained, they carry noise that drowns the
# explore prior; frozen, the noise goes only into the repeat/gate heads (SNR 2–30).
HEAD_FROZEN = ("item_out", "cat_out", "brand_out", "encoder_in", "encoder_out")
HEADS_BELOW_EPSILON = 2.0

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "stores": 20,
    "rounds": 10,
    "data-dir": "",  # empty: the generated chain for (seed, stores), made on demand
    "out-dir": "",  # empty: <cache>/runs/<run-name>
    "local-epochs": 2,  # with the zero-initialised item-ID vectors, the best DP design at ε 8 (dp-design report)
    "batch-size": 128,
    "lr": 0.01,
    "dp-optimizer": "sgd",
    "dp-lr": 2.0,
    # Which layers DP-SGD trains (DESIGN §5.3): all; heads (the item side and the member
    # encoder frozen, so only the repeat/gate heads take noise); auto = heads below ε 2.
    "dp-train": "auto",
    # Share of the run's target ε each store spends on its one explore-prior release before
    # round 1 (DESIGN §5.3); 0: no release. DP-SGD's σ is calibrated for the rest; composition
    # is sub-additive, so at ε 8 the release's ε 4 costs the rounds little (dp-design report).
    "explore-prior-share": 0.5,
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
    # Fit the store-local layer (DESIGN §5.1) on the final global model in the last round's
    # evaluation and report it as the served `model` (the global model alone: `global_model`).
    "local-layer": True,
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


@dataclass(frozen=True)
class Range:
    """What values a run-config number or name may take. Checked for every key, everywhere
    (simulation, server, store): a NaN, an infinity or a negative clip norm is never a setting."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    zero: bool = False  # 0 allowed besides [low, high] (noise-multiplier: 0 = calibrate)
    choices: tuple = ()
    integer: bool = False  # only for the wording: the type check is DEFAULTS'

    @classmethod
    def whole(cls, low: int) -> "Range":
        """Integers from ``low`` up."""
        return cls(low=low, integer=True)

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # not a number: the type check decides
        if self.zero and value == 0:
            return True
        # Written so that NaN fails every test.
        if not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return True

    def text(self) -> str:
        """The range in words, for errors and the README."""
        if self.choices:
            return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
        low = None if self.low is None else f"{'>' if self.low_open else '≥'} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '≤'} {self.high:g}"
        span = ("an integer " if self.integer else "a finite number ") + " and ".join(p for p in (low, high) if p)
        return f"0, or {span}" if self.zero else span.strip()


# The noise multipliers a store accepts (common.privacy.accountant says why these bounds).
NOISE_RANGE = Range(low=MIN_NOISE_MULTIPLIER, high=MAX_NOISE_MULTIPLIER, zero=True)

DELTA_RANGE = Range(low=1e-30, high=1, high_open=True)

RANGES: dict[str, Range] = {
    "seed": Range.whole(0),
    "stores": Range.whole(1),
    "rounds": Range.whole(1),
    "local-epochs": Range.whole(1),
    "batch-size": Range.whole(1),
    # Step sizes are bounded so that no step can carry a weight past float32's range: with
    # |Δw| ≤ lr·(clipped sum + noise)/B per step, a reply stays finite for any finite model.
    "lr": Range(low=0, low_open=True, high=100),
    "dp-optimizer": Range(choices=("sgd", "adam")),
    "dp-lr": Range(low=0, low_open=True, high=100),
    "dp-train": Range(choices=("auto", "all", "heads")),
    "explore-prior-share": Range(low=0, high=0.9),
    "dim": Range.whole(1),
    "hidden": Range.whole(1),
    "history-len": Range.whole(1),
    "test-days": Range.whole(0),
    "target-epsilon": Range(low=0, low_open=True),
    "epsilon-budget": Range(low=0, low_open=True),
    "noise-multiplier": NOISE_RANGE,
    # σ·C is the noise's standard deviation: C ≤ 0 would skip or flip the noise.
    "clip-norm": Range(low=0, low_open=True, high=1e6),
    "local-layer": Range(choices=(True, False)),
    "update-encoding": Range(choices=("float32", "float16", "int8")),
    "dp-path": Range(choices=("bookkeeping", "opacus")),
    # Below 1e-30 the accountants' arithmetic fails (5e-324: a division by zero).
    "delta": DELTA_RANGE,
    "accountant": Range(choices=("prv", "rdp")),
    "fraction-train": Range(low=0, low_open=True, high=1),
    "fraction-evaluate": Range(low=0, high=1),
    "strategy": Range(choices=("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "fedmedian",
                               "fedtrimmedavg", "krum", "multikrum")),
    "server-lr": Range(low=0),
    "server-momentum": Range(low=0, high=1, high_open=True),
    # FedProx's pull is stable only while dp-lr·μ < 1 (client.policy checks the product).
    "proximal-mu": Range(low=0, high=10),
    "trim-beta": Range(low=0, high=0.5, high_open=True),
    "krum-malicious": Range.whole(0),
    "min-stores": Range.whole(0),
    "update-norm-factor": Range(low=0),
    "stop-after-round": Range.whole(0),
    "fault": Range(choices=("", "nan", "scale", "shape", "crash", "slow")),
    "fault-stores": Range.whole(0),
    "fault-slow-s": Range(low=0),
    "node-wait-s": Range(low=0),
    "round-timeout-s": Range(low=0, low_open=True),
}


def check_values(values: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first value outside its key's range (see RANGES)."""
    for key, value in values.items():
        rule = RANGES.get(key)
        if rule is not None and not rule.allows(value):
            raise ConfigError(f"run config '{key}' must be {rule.text()}, got {value!r}")


def cache_root() -> Path:
    """Where generated chains and run results go: $STOREFED_CACHE or ~/.cache/storefed."""
    env = os.environ.get("STOREFED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "storefed"


def default_chain_dir(seed: int, stores: int) -> Path:
    return cache_root() / f"chain-seed{seed}-stores{stores}"


class ConfigError(ValueError):
    """A run config key or value that storefed does not accept."""


@dataclass(frozen=True)
class ModelConfig:
    """The recommender's shape (common.learning.model): the run config's dim and hidden."""

    dim: int = 64
    hidden: int = 128


@dataclass(frozen=True)
class RunConfig:
    """The run configuration with defaults filled in and types checked."""

    values: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any] | None = None) -> "RunConfig":
        """Merge ``given`` over :data:`DEFAULTS`; unknown keys, wrong types and values outside
        :data:`RANGES` are errors."""
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
        check_values(merged)
        return cls(merged)

    def model_config(self) -> ModelConfig:
        """The shape of the run's model."""
        return ModelConfig(dim=int(self["dim"]), hidden=int(self["hidden"]))

    def frozen_layers(self) -> tuple[str, ...]:
        """The layers DP-SGD leaves as they are (``dp-train``; auto: heads only below ε 2)."""
        mode = self["dp-train"]
        if mode == "auto":
            mode = "heads" if float(self["target-epsilon"]) < HEADS_BELOW_EPSILON else "all"
        return HEAD_FROZEN if mode == "heads" and self["dp"] else ()

    def chain_dir(self) -> Path:
        data = str(self["data-dir"])
        return Path(data).expanduser().resolve() if data else default_chain_dir(self["seed"], self["stores"])

    def generated(self) -> bool:
        """True when the chain is the generated default rather than given data."""
        return not str(self["data-dir"])
