"""A store node: which store this node is, its data, its model and its privacy settings.

No Flower here: :mod:`client.client_app` turns messages into calls of these functions.

A node finds its store from its node config:

* deployment: ``store-dir = "/srv/store/S001"`` (and optionally ``catalog``);
* simulation: ``partition-id`` i of ``num-partitions`` → the i-th store of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from client import prepared_cache
from client.receipts_journal import journal_path
from common.privacy import accountant as privacy
from common.config import DEFAULTS, RunConfig
from common.data.dataset import ExampleConfig, StoreData
from common.data.ingest import prepare_store
from common.data.storefiles import DataError, read_store_meta, store_dirs
from common.learning.training import sample_rate_for, steps_per_epoch


@dataclass
class StoreNode:
    """A store's data and settings, built once per process and reused every round."""

    store_id: str
    store_dir: Path
    data: StoreData
    meta: dict
    simulated: bool

    def delta(self, cfg: RunConfig) -> float:
        """The store's δ: its own setting, else the run's default capped at 1/(10·members)."""
        own = float(self.meta.get("delta", 0) or 0)
        return own or privacy.store_delta(self.data.n_train_members, float(cfg["delta"]))


_CACHE: dict[tuple, tuple[StoreData, dict]] = {}


def resolve_store_dir(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[Path, Path, bool]:
    """(store_dir, catalog_path_dir, simulated) for this node."""
    if "store-dir" in node_config:
        store_dir = Path(str(node_config["store-dir"])).expanduser().resolve()
        catalog = Path(str(node_config.get("catalog", store_dir.parent.parent))).expanduser().resolve()
        return store_dir, catalog, False
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


def store_label(node_config: Mapping[str, Any]) -> str:
    """How to name this node's store in a message, even when its files cannot be used:
    the store_id of its store.json, else its directory's name, else the simulation partition."""
    if "store-dir" in node_config:
        store_dir = Path(str(node_config["store-dir"])).expanduser()
        try:
            return str(read_store_meta(store_dir)["store_id"])
        except (DataError, OSError):
            return store_dir.name or str(store_dir)
    if "partition-id" in node_config:
        return f"partition-{node_config['partition-id']}"
    return "unnamed store (node config has no store-dir)"


def load_store(node_config: Mapping[str, Any], cfg: RunConfig) -> StoreNode:
    """The node's store; its data is read and prepared once per process (by path and settings)."""
    store_dir, catalog_dir, simulated = resolve_store_dir(node_config, cfg)
    if not store_dir.is_dir():
        raise DataError(f"{store_dir}: store directory not found; check the node config's store-dir "
                        "(flower-supernode --node-config \"store-dir='...'\")")
    ex_cfg = example_config(cfg)
    meta = read_store_meta(store_dir)
    state = state_dir_for(store_dir, node_config, cfg, str(meta["store_id"]))
    journal = journal_path(state)  # receipts taken by `storefed serve` train too
    journal_mtime = journal.stat().st_mtime if journal.exists() else 0.0
    key = (str(store_dir), str(catalog_dir), ex_cfg, _mtime(store_dir), journal_mtime)
    if key not in _CACHE:
        quarantine = state / "quarantine"
        consent = _assume_consent(node_config, meta)
        # A simulated store may be served by any of the simulation's worker processes; the
        # first one to prepare it leaves a copy for the others (see prepared_cache).
        disk = prepared_cache.path(store_dir, catalog_dir, ex_cfg, consent) if simulated and not journal_mtime else None
        data = prepared_cache.load(disk) if disk else None
        if data is None:
            # The same validation as `storefed validate`: training uses exactly the accepted rows.
            data, _ = prepare_store(store_dir, catalog_dir, ex_cfg, quarantine_dir=quarantine, assume_consent=consent,
                                    journal=journal)
            if disk and not (quarantine.exists() and any(quarantine.iterdir())):
                prepared_cache.save(disk, data)  # only when nothing was quarantined: a cache hit writes nothing
        _CACHE[key] = (data, meta)
    # Only the data is cached: how this node was addressed is decided per call.
    data, meta = _CACHE[key]
    return StoreNode(str(meta["store_id"]), store_dir, data, meta, simulated)


def _assume_consent(node_config: Mapping[str, Any], meta: dict) -> bool:
    return bool(node_config.get("assume-consent", meta.get("assume_consent", False)))


def _mtime(store_dir: Path) -> float:
    return max((p.stat().st_mtime for p in store_dir.iterdir() if p.is_file()), default=0.0)


def state_dir(node: StoreNode, node_config: Mapping[str, Any], cfg: RunConfig) -> Path:
    """Where the store keeps what outlives a run (ledger, quarantine)."""
    return state_dir_for(node.store_dir, node_config, cfg, node.store_id)


def state_dir_for(store_dir: Path, node_config: Mapping[str, Any], cfg: RunConfig, store_id: str) -> Path:
    """Node config ``state-dir``, else the run's ``state-dir``/<store-id>, else <store-dir>/state."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser().resolve()
    if str(cfg["state-dir"]):
        return Path(str(cfg["state-dir"])).expanduser().resolve() / store_id
    return Path(store_dir) / "state"


def epsilon_budget(node: StoreNode, node_config: Mapping[str, Any], cfg: RunConfig) -> float:
    """The store's ε_max over all runs: the smallest of node config, store.json and run config.

    A deployed store that sets no budget of its own keeps the default (8): the run config
    comes from the server, which may lower a store's budget but never raise it. A
    simulation takes the run config's value as given (experiments at other budgets).
    """
    candidates = [float(cfg["epsilon-budget"])]
    own = []
    for source in (node_config, node.meta):
        for key in ("epsilon-budget", "epsilon_budget"):
            if source.get(key) not in (None, ""):
                own.append(float(source[key]))
    if not own and not node.simulated:
        own.append(float(DEFAULTS["epsilon-budget"]))
    return min(candidates + own)


def example_config(cfg: RunConfig) -> ExampleConfig:
    return ExampleConfig(history_len=int(cfg["history-len"]), test_days=int(cfg["test-days"]))


def planned_noise(node: StoreNode, cfg: RunConfig) -> float:
    """σ for this store: the configured one, or calibrated so that this run's planned rounds
    alone end at the run's ε target (the budget then caps the total over all runs)."""
    if float(cfg["noise-multiplier"]) > 0:
        return float(cfg["noise-multiplier"])
    n = node.data.n_train_members
    q = sample_rate_for(n, int(cfg["batch-size"]))
    steps = int(cfg["rounds"]) * int(cfg["local-epochs"]) * steps_per_epoch(n, int(cfg["batch-size"]))
    return _calibrated(float(cfg["target-epsilon"]), node.delta(cfg), q, steps, str(cfg["accountant"]))


_SIGMA_CACHE: dict[tuple, float] = {}


def _calibrated(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    key = (target, delta, q, steps, accountant)
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = privacy.calibrate_noise(target, delta, q, steps, accountant)
    return _SIGMA_CACHE[key]
