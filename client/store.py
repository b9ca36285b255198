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
from client.state.paths import StorePaths
from client.state.receipts_journal import journal_sources, journal_stamp
from common.privacy import accountant as privacy
from common.privacy.published_size import bucket, declared_size
from common.config import RunConfig
from common.data.dataset import ExampleConfig, StoreData
from common.data.ingest import prepare_store
from common.data.storefiles import DataError, read_store_meta


@dataclass
class StoreNode:
    """A store's data and settings, built once per process and reused every round."""

    store_id: str
    paths: StorePaths
    data: StoreData
    meta: dict
    # The size the store publishes (DESIGN §4.1): q, steps, divisor, σ, δ and the FedAvg
    # weight follow it, never the exact count. None: a deployed store that declares none.
    published: int | None = None
    published_source: str = ""

    @property
    def store_dir(self) -> Path:
        return self.paths.store_dir

    @property
    def simulated(self) -> bool:
        return self.paths.simulated

    def published_size(self) -> int:
        """The published size; a deployed store without one cannot train (DataError)."""
        if self.published is None:
            # No count in this message: a refusal's reason leaves the store.
            raise DataError(f"{self.paths.store_json}: no 'published_size'. A store trains with DP only "
                            "at a size it publishes (it sets the sampling rate, the steps, the noise and the "
                            "FedAvg weight, so that none of them follows the exact member count). Add "
                            "\"published_size\": N to store.json, or published-size to the node config; "
                            "'storefed validate' suggests N")
        return self.published

    def delta(self, cfg: RunConfig) -> float:
        """The store's δ: the run config's (already the store's own, see
        :func:`client.policy.store_settings`), capped at 1/(10·published size)."""
        return privacy.store_delta(self.published_size(), cfg["delta"])


_CACHE: dict[tuple, tuple[StoreData, dict]] = {}


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
    """The node's store; its data is read and prepared once per process (by path and settings).
    ``cfg`` is the run config with the store's settings in place (:func:`client.policy.store_settings`)."""
    paths = StorePaths.of_node(node_config, cfg)
    if not paths.store_dir.is_dir():
        raise DataError(f"{paths.store_dir}: store directory not found; check the node config's store-dir "
                        "(flower-supernode --node-config \"store-dir='...'\")")
    ex_cfg = example_config(cfg)
    meta = read_store_meta(paths.store_dir)
    state = paths.state_dir
    # Receipts taken by `storefed serve` train too. The journal's stamp (its line count and
    # last row id: with WAL the file's mtime may not move) keys the cache.
    stamp = journal_stamp(state)
    key = (str(paths.store_dir), str(paths.catalog_dir), ex_cfg, _mtime(paths.store_dir), stamp)
    if key not in _CACHE:
        quarantine = paths.quarantine
        consent = _assume_consent(node_config, meta)
        # A simulated store may be served by any of the simulation's worker processes; the
        # first one to prepare it leaves a copy for the others (see prepared_cache).
        disk = prepared_cache.path(paths.store_dir, paths.catalog_dir, ex_cfg, consent) \
            if paths.simulated and not stamp else None
        data = prepared_cache.load(disk) if disk else None
        if data is None:
            # The same validation as `storefed validate`: training uses exactly the accepted rows.
            data, _ = prepare_store(paths.store_dir, paths.catalog_dir, ex_cfg, quarantine_dir=quarantine,
                                    assume_consent=consent, journal=journal_sources(state))
            if disk and not (quarantine.exists() and any(quarantine.iterdir())):
                prepared_cache.save(disk, data)  # only when nothing was quarantined: a cache hit writes nothing
        _CACHE[key] = (data, meta)
    # Only the data is cached: how this node was addressed is decided per call.
    data, meta = _CACHE[key]
    published, source = published_size_of(paths.store_dir, meta, node_config, data, paths.simulated)
    return StoreNode(str(meta["store_id"]), paths, data, meta, published, source)


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


def example_config(cfg: RunConfig) -> ExampleConfig:
    return ExampleConfig(history_len=cfg["history-len"], test_days=cfg["test-days"])
