"""Who decides each run-config setting at a deployed store (DESIGN §1, §4.1). Pure: no files, no Flower.

A run's config is written by whoever starts the run, so at a store it is untrusted input.
Every key of :data:`common.config.DEFAULTS` is in exactly one class:

* ``store``: the store's own setting. A deployed store refuses a run that asks otherwise
  (``dp = false``, a ``state-dir``) or does not use the run's value (``accountant``).
* ``tighten``: the store's own setting, which a run may only lower (``epsilon-budget``, ``delta``).
* ``run``: a run may set it within its range (:data:`common.config.RANGES`); each of these is
  either recorded in the ledger (σ, q, steps, C) or changes nothing that the accounting assumes.
* ``simulation``: read only by a simulated store; a deployed store never reads it.
* ``server``: read only by the server; no store reads it.
* ``signature``: the operator's signature over the run (client.run_authorization checks it
  before anything else; a deployed store refuses a run it does not verify).

A simulated store keeps its freedom (reference runs without DP, other budgets, its own
state directory); only the ranges apply there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from common.config import DELTA_RANGE, Range
from common.privacy.accountant import ACCOUNTANTS, DEFAULT_DELTA

STORE, TIGHTEN, RUN, SIMULATION, SERVER, SIGNATURE = "store", "tighten", "run", "simulation", "server", "signature"

# key: (class, what a deployed store does with it). The client/README.md's table "Who sets what at a
# deployed store" is this table; tests/test_store_policy.py checks both against the code.
WHO: dict[str, tuple[str, str]] = {
    "dp": (STORE, "always on; a run with dp=false is refused"),
    "state-dir": (STORE, "the ledger lives in node config state-dir or <store-dir>/state; a run naming one is refused"),
    "accountant": (STORE, "node config / store.json accountant, default prv; the run's value is not used"),
    "epsilon-budget": (TIGHTEN, "the smaller of the store's own (node config / store.json, default 8) and the run's"),
    "delta": (TIGHTEN, "the smallest of the store's own (node config / store.json, default 1e-6), the run's "
                       "and 1/(10 × members)"),
    "noise-multiplier": (RUN, "σ, recorded in the ledger; 0 = calibrate to target-epsilon"),
    "target-epsilon": (RUN, "only sets σ; the budget caps the total"),
    "rounds": (RUN, "planned rounds, only sets σ; the budget caps the total"),
    "clip-norm": (RUN, "C, recorded in the ledger"),
    "batch-size": (RUN, "sets q, recorded in the ledger"),
    "local-epochs": (RUN, "sets steps, recorded in the ledger"),
    "dp-lr": (RUN, "step size of DP-SGD (post-processing)"),
    "dp-train": (RUN, "which layers DP-SGD trains (fewer noised dimensions, same mechanism and clipping)"),
    "explore-prior-share": (RUN, "share of target ε for the store's one explore release per run (DESIGN §5.3), "
                                 "recorded in the ledger; 0 = none; the budget caps the total"),
    "dp-optimizer": (RUN, "post-processing of the noised gradient"),
    "dp-path": (RUN, "two exact implementations of the same mechanism; a deployed store refuses opacus (no secure noise there)"),
    "update-encoding": (RUN, "post-processing of the DP output"),
    "local-layer": (RUN, "the store-local layer (DESIGN §5.1): stays at the store, never enters the DP update"),
    "dim": (RUN, "model shape; must match the server's model"),
    "hidden": (RUN, "model shape; must match the server's model"),
    "history-len": (RUN, "items per member history; still one example per member"),
    "test-days": (RUN, "the train/test cut; the ledger records the resulting q and steps"),
    "seed": (SIMULATION, "a deployed store draws its sampling and noise seed from the OS"),
    "data-dir": (SIMULATION, "a deployed store's data is its node config store-dir"),
    "stores": (SIMULATION, "picks the generated chain in simulation"),
    "lr": (SIMULATION, "training without DP only, which a deployed store never does"),
    "fault": (SIMULATION, "fault injection"),
    "fault-stores": (SIMULATION, "fault injection"),
    "fault-slow-s": (SIMULATION, "fault injection"),
    "out-dir": (SERVER, ""),
    "fraction-train": (SERVER, ""),
    "fraction-evaluate": (SERVER, ""),
    "strategy": (SERVER, ""),
    "server-lr": (SERVER, ""),
    "server-momentum": (SERVER, ""),
    "proximal-mu": (SERVER, "the store reads FedProx's copy in the train message, range-checked (≤ 10, and dp-lr × μ < 1)"),
    "trim-beta": (SERVER, ""),
    "krum-malicious": (SERVER, ""),
    "min-stores": (SERVER, ""),
    "update-norm-factor": (SERVER, ""),
    "checkpoint-dir": (SERVER, ""),
    "resume": (SERVER, ""),
    "stop-after-round": (SERVER, ""),
    "node-wait-s": (SERVER, ""),
    "round-timeout-s": (SERVER, ""),
    "run-signature": (SIGNATURE, "ed25519 over every other key; checked before any data is read"),
    "run-expires": (SIGNATURE, "signed; judged when the store first sees the run"),
    "run-nonce": (SIGNATURE, "signed; recorded in the store's state dir, a second run with it is refused"),
    "run-fab-hash": (SIGNATURE, "signed; the FAB's hash must equal it (client.daemon.pinned_exec)"),
    "operator-key-id": (SIGNATURE, "signed; must name the store's operator public key"),
}

# The keys of a train or evaluate message's "config" record that a store reads (Flower's
# strategies write them); outside numbers like the run config's.
MESSAGE_RANGES: dict[str, Range] = {
    "server-round": Range(low=0, high=1_000_000, integer=True),
    "proximal-mu": Range(low=0, high=10),
}

STORE_DEFAULT_BUDGET = 8.0
STORE_DEFAULT_ACCOUNTANT = "prv"
_BUDGET = Range(low=0, low_open=True)
_DELTA = DELTA_RANGE


class PolicyError(ValueError):
    """A run asks for something this store does not allow, or a store setting is unusable."""


def keys_of(kind: str) -> set[str]:
    """The run-config keys of one class."""
    return {key for key, (who, _) in WHO.items() if who == kind}


@dataclass(frozen=True)
class OwnSettings:
    """A store's own privacy settings; None where the store sets none."""

    epsilon_budget: float | None = None
    delta: float | None = None
    accountant: str | None = None


def _own_number(where: str, value: Any, rule: Range) -> float:
    if isinstance(value, bool):
        raise PolicyError(f"{where} must be {rule.text()}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{where} must be {rule.text()}, got {value!r}") from None
    if not rule.allows(number):
        raise PolicyError(f"{where} must be {rule.text()}, got {value!r}; fix the store's setting")
    return number


def own_settings(node_config: Mapping[str, Any], meta: Mapping[str, Any], meta_name: str = "store.json") -> OwnSettings:
    """The store's budget, δ and accountant from its node config and its store.json (the
    smaller number where both set one; the node config's accountant first). Raises
    PolicyError naming the setting when one is not a usable value."""
    budgets: list[float] = []
    deltas: list[float] = []
    accountants: list[str] = []
    for source, name in ((node_config, "node config"), (meta, meta_name)):
        for key in ("epsilon-budget", "epsilon_budget"):
            if source.get(key) not in (None, ""):
                budgets.append(_own_number(f"{name} '{key}'", source[key], _BUDGET))
        if source.get("delta") not in (None, "", 0):
            deltas.append(_own_number(f"{name} 'delta'", source["delta"], _DELTA))
        if source.get("accountant") not in (None, ""):
            if source["accountant"] not in ACCOUNTANTS:
                raise PolicyError(f"{name} 'accountant' must be one of {', '.join(ACCOUNTANTS)}, "
                                  f"got {source['accountant']!r}; fix the store's setting")
            accountants.append(str(source["accountant"]))
    return OwnSettings(min(budgets) if budgets else None, min(deltas) if deltas else None,
                       accountants[0] if accountants else None)


def tightened(run: float, own: Iterable[float | None]) -> float:
    """The smallest of the run's value and the store's own ones: a run may only lower them.
    Raises PolicyError on a value that is not finite (NaN would slip through ``min``)."""
    values = [float(run)] + [float(v) for v in own if v is not None]
    if not all(math.isfinite(v) for v in values):
        raise PolicyError(f"a privacy setting is not a finite number: {values}")
    return min(values)


def effective_budget(run: float, own: OwnSettings, deployed: bool) -> float:
    """ε_max over all runs: the run's, lowered by the store's own; a deployed store with no
    budget of its own keeps the default 8 (a simulation takes the run's as given)."""
    default = STORE_DEFAULT_BUDGET if deployed and own.epsilon_budget is None else None
    return tightened(run, [own.epsilon_budget, default])


def effective_delta(run: float, own: OwnSettings, deployed: bool) -> float:
    """δ before the cap 1/(10 × members): the run's, lowered by the store's own; a deployed
    store with no δ of its own keeps the default 1e-6."""
    default = DEFAULT_DELTA if deployed and own.delta is None else None
    return tightened(run, [own.delta, default])


def refusals(values: Mapping[str, Any]) -> list[str]:
    """Why a deployed store refuses a run with these run-config values (empty: it does not)."""
    reasons = []
    if values.get("dp") is not True:
        reasons.append(f"run config dp={values.get('dp')!r}: a deployed store trains only with DP; "
                       "remove dp from the run config")
    if str(values.get("state-dir", "")):
        reasons.append(f"run config state-dir={values['state-dir']!r}: a deployed store keeps its ledger "
                       "in its own state directory (node config state-dir or <store-dir>/state); "
                       "remove state-dir from the run config")
    if str(values.get("dp-path", "bookkeeping")) != "bookkeeping":
        # Only the book-keeping path draws from the secure stream (common.privacy.secure_noise);
        # Opacus' secure mode needs torchcsprng, which does not build with torch 2.
        reasons.append(f"run config dp-path={values['dp-path']!r}: a deployed store draws its noise from a "
                       "cryptographically secure stream, which only the book-keeping path has; "
                       "remove dp-path from the run config")
    return reasons


def resolved_values(values: Mapping[str, Any], own: OwnSettings, deployed: bool) -> dict[str, Any]:
    """The privacy values a store uses instead of the run's: budget and δ lowered by the
    store's own (a deployed store's defaults where it sets none) and, at a deployed store,
    its own accountant. The one place where a store's budget, δ and accountant are decided."""
    out: dict[str, Any] = {
        "epsilon-budget": effective_budget(float(values["epsilon-budget"]), own, deployed=deployed),
        "delta": effective_delta(float(values["delta"]), own, deployed=deployed),
    }
    if deployed:
        out["accountant"] = own.accountant or STORE_DEFAULT_ACCOUNTANT
    return out


def deployed_values(values: Mapping[str, Any], own: OwnSettings) -> dict[str, Any]:
    """The store-decided and tightened run-config values a deployed store uses instead of the run's."""
    return resolved_values(values, own, deployed=True)


def check_message_config(config: Mapping[str, Any]) -> None:
    """Raise PolicyError when a value the store reads from a message's config is out of range."""
    for key, rule in MESSAGE_RANGES.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not rule.allows(value):
            raise PolicyError(f"message config '{key}' must be {rule.text()}, got {value!r}")
    # Keys the store does not read are not used, but a number that is not finite is refused
    # wherever it stands: nothing non-finite from outside goes any further.
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PolicyError(f"message config '{key}' must be a finite number, got {value!r}")


def check_proximal_step(dp_lr: float, proximal_mu: float) -> None:
    """Refuse FedProx settings whose pull would grow the weights instead of damping them:
    the SGD step multiplies w − w_global by (1 − lr·μ), so lr·μ must stay below 1. Public
    values only: the refusal says nothing about members."""
    if dp_lr * proximal_mu >= 1.0:
        raise PolicyError(f"FedProx proximal-mu {proximal_mu:g} with dp-lr {dp_lr:g}: their product must be "
                          "below 1, or the proximal term would make the weights diverge; lower either")
