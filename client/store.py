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

from client.state import prepared_cache
from client.state.receipts_journal import journal_sources, journal_stamp
from common.privacy import accountant as privacy
from common.privacy import store_policy
from common.privacy.published_size import bucket, declared_size
from common.config import RunConfig
from common.data.dataset import ExampleConfig, StoreData
from common.data.ingest import prepare_store
from common.data.storefiles import DataError, read_store_meta, store_dirs
from common.learning.training import expected_batch, sample_rate_for, steps_per_epoch


@dataclass
class StoreNode:
    """A store's data and settings, built once per process and reused every round."""

    store_id: str
    store_dir: Path
    data: StoreData
    meta: dict
    simulated: bool
    # The size the store publishes (DESIGN §4.1): q, steps, divisor, σ, δ and the FedAvg
    # weight follow it, never the exact count. None: a deployed store that declares none.
    published: int | None = None
    published_source: str = ""

    def published_size(self) -> int:
        """The published size; a deployed store without one cannot train (DataError)."""
        if self.published is None:
            # No count in this message: a refusal's reason leaves the store.
            raise DataError(f"{self.store_dir / 'store.json'}: no 'published_size'. A store trains with DP only "
                            "at a size it publishes (it sets the sampling rate, the steps, the noise and the "
                            "FedAvg weight, so that none of them follows the exact member count). Add "
                            "\"published_size\": N to store.json, or published-size to the node config; "
                            "'storefed validate' suggests N")
        return self.published

    def delta(self, cfg: RunConfig) -> float:
        """The store's δ: the smallest of its own setting, the run's and 1/(10·published size).

        A run may only lower δ (a deployed store's node config δ is already in ``cfg``, see
        client.policy); a deployed store with no δ of its own keeps the default 1e-6."""
        own = store_policy.own_settings({}, self.meta, str(self.store_dir / "store.json"))
        setting = store_policy.effective_delta(float(cfg["delta"]), own, deployed=not self.simulated)
        return privacy.store_delta(self.published_size(), setting)


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
    # Receipts taken by `storefed serve` train too. The journal's stamp (its line count and
    # last row id: with WAL the file's mtime may not move) keys the cache.
    stamp = journal_stamp(state)
    key = (str(store_dir), str(catalog_dir), ex_cfg, _mtime(store_dir), stamp)
    if key not in _CACHE:
        quarantine = state / "quarantine"
        consent = _assume_consent(node_config, meta)
        # A simulated store may be served by any of the simulation's worker processes; the
        # first one to prepare it leaves a copy for the others (see prepared_cache).
        disk = prepared_cache.path(store_dir, catalog_dir, ex_cfg, consent) if simulated and not stamp else None
        data = prepared_cache.load(disk) if disk else None
        if data is None:
            # The same validation as `storefed validate`: training uses exactly the accepted rows.
            data, _ = prepare_store(store_dir, catalog_dir, ex_cfg, quarantine_dir=quarantine, assume_consent=consent,
                                    journal=journal_sources(state))
            if disk and not (quarantine.exists() and any(quarantine.iterdir())):
                prepared_cache.save(disk, data)  # only when nothing was quarantined: a cache hit writes nothing
        _CACHE[key] = (data, meta)
    # Only the data is cached: how this node was addressed is decided per call.
    data, meta = _CACHE[key]
    published, source = published_size_of(store_dir, meta, node_config, data, simulated)
    return StoreNode(str(meta["store_id"]), store_dir, data, meta, simulated, published, source)


def published_size_of(store_dir: Path, meta: dict, node_config: Mapping[str, Any], data: StoreData,
                      simulated: bool) -> tuple[int | None, str]:
    """The store's declared size; a simulated store that declares none gets its exact count
    rounded up to the R10 grid (a simulation protects no one; see published_size)."""
    try:
        size, source = declared_size(meta, node_config)
    except ValueError as exc:
        raise DataError(f"{store_dir}: {exc}") from None
    if size is None and simulated:
        return bucket(data.n_train_members), "simulation fallback: the exact count rounded up to the R10 grid"
    return size, source


def _assume_consent(node_config: Mapping[str, Any], meta: dict) -> bool:
    return bool(node_config.get("assume-consent", meta.get("assume_consent", False)))


def _mtime(store_dir: Path) -> float:
    return max((p.stat().st_mtime for p in store_dir.iterdir() if p.is_file()), default=0.0)


def state_dir(node: StoreNode, node_config: Mapping[str, Any], cfg: RunConfig) -> Path:
    """Where the store keeps what outlives a run (ledger, quarantine)."""
    return state_dir_for(node.store_dir, node_config, cfg, node.store_id)


def state_dir_for(store_dir: Path, node_config: Mapping[str, Any], cfg: RunConfig, store_id: str) -> Path:
    """Node config ``state-dir``, else (simulation only) the run's ``state-dir``/<store-id>,
    else <store-dir>/state. A deployed store never keeps its ledger where a run says."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser().resolve()
    if "store-dir" not in node_config and str(cfg["state-dir"]):
        return Path(str(cfg["state-dir"])).expanduser().resolve() / store_id
    return Path(store_dir) / "state"


def epsilon_budget(node: StoreNode, node_config: Mapping[str, Any], cfg: RunConfig) -> float:
    """The store's ε_max over all runs: the smallest of node config, store.json and run config.

    A deployed store that sets no budget of its own keeps the default (8): the run config
    comes from the server, which may lower a store's budget but never raise it. A
    simulation takes the run config's value as given (experiments at other budgets).
    """
    own = store_policy.own_settings(node_config, node.meta, str(node.store_dir / "store.json"))
    return store_policy.effective_budget(float(cfg["epsilon-budget"]), own, deployed=not node.simulated)


def example_config(cfg: RunConfig) -> ExampleConfig:
    return ExampleConfig(history_len=int(cfg["history-len"]), test_days=int(cfg["test-days"]))


def planned_noise(node: StoreNode, cfg: RunConfig) -> float:
    """σ for this store: the configured one, or calibrated so that this run's planned rounds
    alone end at the run's ε target (the budget then caps the total over all runs)."""
    if float(cfg["noise-multiplier"]) > 0:
        return float(cfg["noise-multiplier"])
    n = node.published_size()  # never the exact count
    q = sample_rate_for(n, int(cfg["batch-size"]))
    steps = int(cfg["rounds"]) * int(cfg["local-epochs"]) * steps_per_epoch(n, int(cfg["batch-size"]))
    return _calibrated(float(cfg["target-epsilon"]), node.delta(cfg), q, steps, str(cfg["accountant"]))


@dataclass(frozen=True)
class DPPlan:
    """Everything of one round's DP mechanism that is seen outside the store, and what sets
    it: all of it follows the published size and the run's settings, none the exact count."""

    published_size: int
    sample_rate: float
    steps: int  # this round's steps (local epochs × steps per epoch)
    noise_multiplier: float
    divisor: int  # the expected batch that divides the noised sum
    delta: float
    weight: int  # the FedAvg weight sent in the train reply ("num-examples")


def dp_plan(node: StoreNode, cfg: RunConfig) -> DPPlan:
    """The round's mechanism at this store (raises DataError when it publishes no size)."""
    size, batch = node.published_size(), int(cfg["batch-size"])
    q = sample_rate_for(size, batch)
    return DPPlan(published_size=size, sample_rate=q, steps=int(cfg["local-epochs"]) * steps_per_epoch(size, batch),
                  noise_multiplier=planned_noise(node, cfg), divisor=expected_batch(size, q),
                  delta=node.delta(cfg), weight=size)


_SIGMA_CACHE: dict[tuple, float] = {}


def _calibrated(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    key = (target, delta, q, steps, accountant)
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = privacy.calibrate_noise(target, delta, q, steps, accountant)
    return _SIGMA_CACHE[key]
