"""The store's own policy, applied to every message before the store reads any data.

A deployed store (node config ``store-dir``) decides its privacy itself, whatever the run
config says (DESIGN §1, §4.1): it refuses a run that asks for training without DP or for a
ledger elsewhere than its own state directory, uses its own accountant, and lets a run only
lower its ε budget and δ. Every number from outside must be in range, in simulation too.
Which key is whose: :mod:`common.privacy.store_policy`. Refusals raise PolicyError, which
the ClientApp turns into a refusal reply (wire.REFUSE_CODE) before anything is trained or sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from flwr.app import Message

from common.config import RunConfig, check_values
from common.data.contract import STORE_JSON
from common.data.storefiles import read_store_meta
from common.privacy import store_policy
from common.privacy.store_policy import PolicyError

__all__ = ["PolicyError", "enforce", "is_deployed"]


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """A store daemon names its store directory; a simulated node has a partition instead."""
    return "store-dir" in node_config


def enforce(msg: Message, node_config: Mapping[str, Any], cfg: RunConfig) -> RunConfig:
    """The run config this store uses for ``msg``: ``cfg`` checked, and at a deployed store
    with the store's own settings in place. Raises PolicyError (or ConfigError) to refuse."""
    check_values(cfg.values)  # a RunConfig built without from_mapping is checked here too
    conf = msg.content["config"] if "config" in msg.content else {}
    store_policy.check_message_config(conf)
    if "proximal-mu" in conf:  # FedProx's pull, read by training (client.client_app)
        store_policy.check_proximal_step(float(cfg["dp-lr"] if cfg["dp"] else cfg["lr"]), float(conf["proximal-mu"]))
    if not is_deployed(node_config):
        return cfg  # simulation: the run's settings, in range (no-DP references, other budgets)
    reasons = store_policy.refusals(cfg.values)
    if reasons:
        raise PolicyError("; ".join(reasons))
    store_dir = Path(str(node_config["store-dir"])).expanduser().resolve()
    # store.json holds the store's settings, no member data; a missing directory is
    # refused by load_store with its own message right after.
    meta = read_store_meta(store_dir) if store_dir.is_dir() else {}
    own = store_policy.own_settings(node_config, meta, str(store_dir / STORE_JSON))
    return RunConfig({**cfg.values, **store_policy.deployed_values(cfg.values, own)})
