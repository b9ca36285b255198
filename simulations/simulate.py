"""The Python entry for a simulation: many stores in one process, results as a dict.

Runs the same ServerApp and ClientApp as `flwr run .` through Flower's simulation runtime
(Ray backend), with the run config given here instead of pyproject overrides.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from common.config import RunConfig


def backend_config(*, ray_address: str | None = None, num_cpus: int | None = None,
                   verbose: bool = False) -> dict:
    """Flower's Ray backend config: one CPU per store task; a local Ray on ``num_cpus``
    cores (default: all), or, given ``ray_address`` (or ``$RAY_ADDRESS``), an existing
    Ray cluster, whose nodes then set the cores."""
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": verbose}
    address = ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        init["address"] = address  # Ray refuses num_cpus when it attaches to a cluster
    else:
        init["num_cpus"] = num_cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init}


def simulate(config: Mapping[str, Any] | None = None, *, verbose: bool = False, ray_address: str | None = None,
             num_cpus: int | None = None) -> dict:
    """Run a simulation with ``config`` (run-config keys, see :data:`common.config.DEFAULTS`).

    One simulated SuperNode per store (``stores``). Returns the results object that
    `storefed simulate --json` prints; it is also written to ``<out-dir>/results.json``.
    ``ray_address``/``num_cpus``: see :func:`backend_config`.
    Raises ``RuntimeError`` when the run did not produce results.
    """
    # Flower's Ray backend gives its workers the driver's sys.path as PYTHONPATH. An entry ""
    # (python -c, or a script elsewhere) would mean the *worker's* cwd, so workers could
    # import another copy of this project (e.g. an installed one): name this copy explicitly.
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Silences a Ray notice about GPU variables; this project uses no GPU.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from simulations import flower_patches

    flower_patches.apply()  # Flower's message poller is O(stores²) per tick; see the module

    from client.client_app import create_app as client_app
    from server.server_app import create_app as server_app

    given = dict(config or {})
    if not given.get("out-dir"):
        given["out-dir"] = tempfile.mkdtemp(prefix="storefed-run-")
    cfg = RunConfig.from_mapping(given)
    out = Path(str(cfg["out-dir"])) / "results.json"
    out.unlink(missing_ok=True)
    if not verbose:
        # Flower warns that run_simulation is deprecated in favour of `flwr run`; both are
        # supported here (README), so keep the user's screen for the run's own lines.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(
        server_app=server_app(cfg.values),
        client_app=client_app(cfg.values),
        num_supernodes=int(cfg["stores"]),
        backend_config=backend_config(ray_address=ray_address, num_cpus=num_cpus, verbose=verbose),
        verbose_logging=verbose,
    )
    if not out.exists():
        raise RuntimeError("the simulation ended without results; rerun with --verbose to see Flower's log")
    results = json.loads(out.read_text())
    results["member_privacy"] = chain_member_privacy(cfg)
    from common.data.storefiles import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    return results


def chain_member_privacy(cfg: RunConfig) -> dict:
    """`member_privacy`: each person's ε over every store they trained at, from the stores'
    ledgers (all runs) and their training members — what only a simulation, which sees
    every store, can compute (see common.privacy.member_privacy)."""
    from client.ledger import read_events
    from client.store import epsilon_budget, load_store, state_dir
    from common.data import contract
    from common.data.storefiles import DataError, locate, read_table, store_dirs
    from common.privacy.member_privacy import member_privacy

    dirs = store_dirs(cfg.chain_dir())[: int(cfg["stores"])]
    histories, deltas, trained, registered, budgets = {}, {}, {}, {}, []
    for part, store_dir in enumerate(dirs):
        members_file = locate(store_dir, contract.MEMBERS_FILE)
        if members_file is not None:
            registered[store_dir.name] = read_table(members_file, ("member_id",))["member_id"].str.strip().tolist()
        try:
            node = load_store({"partition-id": part, "num-partitions": len(dirs)}, cfg)
        except DataError:
            continue  # a store that cannot load its data trained no one
        events = read_events(state_dir(node, {}, cfg), node.store_id)
        registered[node.store_id] = registered.pop(store_dir.name, [])
        histories[node.store_id] = [e.mechanism() for e in events]
        deltas[node.store_id] = min((e.delta for e in events), default=1.0)
        trained[node.store_id] = [str(m) for m in node.data.member_ids] if events else []
        budgets.append(epsilon_budget(node, {}, cfg))
    result = member_privacy(histories, deltas, trained, registered, max(budgets, default=float(cfg["epsilon-budget"])),
                            str(cfg["accountant"]))
    if not cfg["dp"]:
        result["max_epsilon"] = None  # trained without noise: unbounded (JSON has no infinity)
    return result
