"""The store's own policy, applied to every message before the store reads any data.

A deployed store (node config ``store-dir``) decides its privacy itself, whatever the run
config says (DESIGN §1, §4.1): it refuses a run that asks for training without DP or for a
ledger elsewhere than its own state directory, uses its own accountant, and lets a run only
lower its ε budget and δ. Every number from outside must be in range, in simulation too.
Which key is whose: :mod:`client.store_policy`. Refusals raise PolicyError, which
the ClientApp turns into a refusal reply (wire.REFUSE_CODE) before anything is trained or sent.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import Message

from client.state.paths import StorePaths

from common.config import RunConfig, check_values
from common.data.storefiles import read_store_meta
from client import store_policy
from client.store_policy import PolicyError

__all__ = ["PolicyError", "enforce", "is_deployed", "store_settings"]


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """A store daemon names its store directory; a simulated node has a partition instead."""
    return "store-dir" in node_config


def enforce(msg: Message, node_config: Mapping[str, Any], cfg: RunConfig) -> RunConfig:
    """The run config this store uses for ``msg``: ``cfg`` checked, and at a deployed store
    with the store's own settings in place (:func:`store_settings`). Raises PolicyError (or
    ConfigError, DataError) to refuse."""
    check_values(cfg.values)  # a RunConfig built without from_mapping is checked here too
    conf = msg.content["config"] if "config" in msg.content else {}
    store_policy.check_message_config(conf)
    if "proximal-mu" in conf:  # FedProx's pull, read by training (client.client_app)
        store_policy.check_proximal_step(float(cfg["dp-lr"] if cfg["dp"] else cfg["lr"]), float(conf["proximal-mu"]))
    if is_deployed(node_config):
        reasons = store_policy.refusals(cfg.values)
        if reasons:
            raise PolicyError("; ".join(reasons))
    return store_settings(node_config, cfg)


def store_settings(node_config: Mapping[str, Any], cfg: RunConfig) -> RunConfig:
    """``cfg`` with the store's own privacy settings in place (node config and store.json):
    budget and δ as a run may only lower them, and a deployed store's accountant. Resolved
    here once per message; everything after reads them from the returned config. A
    simulation takes the run's values within the same rule (no-DP references and other
    budgets are the run's to choose). Raises PolicyError on a store setting that is unusable."""
    paths = StorePaths.of_node(node_config, cfg)
    # store.json holds the store's settings, no member data; a missing directory is
    # refused by load_store with its own message right after.
    meta = read_store_meta(paths.store_dir) if paths.store_dir.is_dir() else {}
    own = store_policy.own_settings(node_config, meta, str(paths.store_json))
    return RunConfig({**cfg.values, **store_policy.resolved_values(cfg.values, own, is_deployed(node_config))})
