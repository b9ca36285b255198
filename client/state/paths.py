"""Where a store's files are: its data, the chain's catalog and its state directory.

One place decides the layout (DESIGN §3): a store directory holds the store's own files
(``store.json``, members, receipts); the catalog is the chain's, by default two levels up
(``<chain>/stores/<store>`` → ``<chain>``); everything a store keeps across runs (ledger,
kept model and layer, quotas, nonces, the receipts journal, quarantined rows) lives in its
state directory, by default ``<store-dir>/state``. Each state file's name is its module's
(:mod:`client.state.ledger`, :mod:`client.state.model_store`, …); the directory is this one.

A deployed store takes its paths from its own node config only: a run may name a state
directory for a simulation's stores, never for a store daemon (DESIGN §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.config import RunConfig
from common.data.contract import STORE_JSON
from common.data.storefiles import DataError, read_store_meta, store_dirs

STATE_DIR = "state"
QUARANTINE_DIR = "quarantine"


def _path(value: Any) -> Path:
    return Path(str(value)).expanduser().resolve()


def default_catalog(store_dir: Path) -> Path:
    """The chain directory that holds a store's directory under ``stores/``."""
    return Path(store_dir).parent.parent


def default_state_dir(store_dir: Path) -> Path:
    return Path(store_dir) / STATE_DIR


@dataclass(frozen=True)
class StorePaths:
    """A store's three places, resolved once; everything else is named inside them."""

    store_dir: Path
    catalog_dir: Path  # the catalog file, or the chain directory that holds it
    state_dir: Path
    simulated: bool = False

    @property
    def store_json(self) -> Path:
        return self.store_dir / STORE_JSON

    @property
    def quarantine(self) -> Path:
        """Where validation writes the rows it did not accept, with their reasons."""
        return self.state_dir / QUARANTINE_DIR

    @classmethod
    def at(cls, store_dir: Path, catalog: Path | None = None, state_dir: Path | None = None) -> "StorePaths":
        """A store's paths as a store's command names them (``storefed validate``, ``serve``,
        ``privacy``): the store directory, and the catalog and state directory when given."""
        store = _path(store_dir)
        return cls(store, _path(catalog) if catalog else default_catalog(store),
                   _path(state_dir) if state_dir else default_state_dir(store))

    @classmethod
    def of_node(cls, node_config: Mapping[str, Any], cfg: RunConfig) -> "StorePaths":
        """This node's store: ``store-dir`` (a store daemon) or the ``partition-id``-th store of
        the run's chain (a simulation). Reads no member data; raises DataError."""
        store_dir, catalog, simulated = resolve_store_dir(node_config, cfg)
        if simulated and not node_config.get("state-dir") and cfg["state-dir"]:
            store_id = str(read_store_meta(store_dir)["store_id"])  # a simulation's state is kept per store id
        else:
            store_id = ""
        return cls(store_dir, catalog, state_dir_for(store_dir, node_config, cfg, store_id), simulated)


def resolve_store_dir(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[Path, Path, bool]:
    """(store_dir, catalog_path_dir, simulated) for this node."""
    if "store-dir" in node_config:
        store_dir = _path(node_config["store-dir"])
        return store_dir, _path(node_config.get("catalog", default_catalog(store_dir))), False
    if "partition-id" not in node_config:
        raise DataError("node config has neither 'store-dir' (a store's data directory) nor "
                        "'partition-id' (simulation); start the SuperNode with "
                        "--node-config \"store-dir='/path/to/store'\"")
    chain = cfg.chain_dir()
    stores = store_dirs(chain)
    part = int(node_config["partition-id"])
    if part >= len(stores):
        raise DataError(f"{chain}: partition {part} but the chain has only {len(stores)} stores")
    return stores[part], chain, True


def state_dir_for(store_dir: Path, node_config: Mapping[str, Any], cfg: RunConfig, store_id: str) -> Path:
    """Node config ``state-dir``, else (simulation only) the run's ``state-dir``/<store-id>,
    else <store-dir>/state. A deployed store never keeps its ledger where a run says."""
    if node_config.get("state-dir"):
        return _path(node_config["state-dir"])
    if "store-dir" not in node_config and cfg["state-dir"]:
        return _path(cfg["state-dir"]) / store_id
    return default_state_dir(store_dir)


def own_state_dir(node_config: Mapping[str, Any]) -> Path | None:
    """The store's state directory from its own configuration only (None: it names no store)."""
    if node_config.get("state-dir"):
        return _path(node_config["state-dir"])
    if node_config.get("store-dir"):
        return default_state_dir(_path(node_config["store-dir"]))
    return None
