"""Flower ServerApp of the chain: start the run, FedAvg over the stores, report.

Glue only: configuration, the initial model and the results go through plain functions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig, cache_root
from common.dataset import ItemIndex
from common.model import ModelConfig, Recommender
from common.storefiles import atomic_write_text, ensure_generated_chain, read_catalog
from common.synth import default_spec
from server.report import build_results, summary_table
from server.strategy import BudgetExhausted, ObservedFedAvg


def _say(text: str) -> None:
    print(text, flush=True)


def wait_for_nodes(grid: Grid, expected: int, wait_s: float) -> int:
    """Wait until ``expected`` nodes are connected or ``wait_s`` passes; return the count."""
    deadline = time.time() + wait_s
    count = 0
    while time.time() < deadline:
        count = len(list(grid.get_node_ids()))
        if count >= expected:
            return count
        time.sleep(0.5)
    return count


def initial_model(cfg: RunConfig, chain_dir: Path) -> Recommender:
    torch.manual_seed(int(cfg["seed"]))
    items = ItemIndex.from_catalog(read_catalog(chain_dir))
    return Recommender(items, ModelConfig(dim=int(cfg["dim"]), hidden=int(cfg["hidden"])))


def run_chain(grid: Grid, cfg: RunConfig, run_name: str) -> dict:
    """Train and evaluate over the connected stores; returns the results object."""
    started = time.time()
    chain_dir = cfg.chain_dir()
    if cfg.generated():
        if ensure_generated_chain(chain_dir, default_spec(int(cfg["stores"]), int(cfg["seed"]))):
            _say(f"generated the chain (seed {cfg['seed']}, {cfg['stores']} stores) at {chain_dir}")
    model = initial_model(cfg, chain_dir)
    nodes = wait_for_nodes(grid, int(cfg["stores"]), float(cfg["node-wait-s"]))
    if nodes == 0:
        raise RuntimeError("no store node connected; start the SuperNodes (or raise num-supernodes)")
    if nodes < int(cfg["stores"]):
        _say(f"note: {nodes} store nodes connected, the chain has {cfg['stores']} stores; training "
             f"with {nodes}. For a simulation of the whole chain pass "
             f"--federation-config \"num-supernodes={cfg['stores']}\".")
    num_rounds = int(cfg["rounds"])
    _say(f"training {num_rounds} rounds over {nodes} stores "
         f"({'DP-SGD, target ε ' + str(cfg['target-epsilon']) + ' per store' if cfg['dp'] else 'no DP'})")
    strategy = ObservedFedAvg(
        num_rounds=num_rounds,
        printer=_say,
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=1.0,
        min_train_nodes=max(1, round(nodes * float(cfg["fraction-train"]))),
        min_evaluate_nodes=nodes,
        min_available_nodes=nodes,
    )
    stopped = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=num_rounds,
            timeout=float(cfg["round-timeout-s"]),
            train_config=ConfigRecord({"run-name": run_name}),
        )
    except BudgetExhausted as exc:
        stopped = str(exc)
        _say(f"stopped: {stopped}")
        if cfg.generated():
            _say("to simulate again from a fresh privacy account, pass a new --state-dir "
                 "(storefed simulate) or run-config state-dir")
    evaluated = [r for r in strategy.rounds if "metrics" in r]
    final = evaluated[-1]["metrics"] if evaluated else {}
    out_dir = Path(str(cfg["out-dir"])).expanduser() if str(cfg["out-dir"]) else cache_root() / "runs" / run_name
    results = build_results(
        cfg=dict(cfg.values), stores=nodes, rounds=strategy.rounds, privacy=strategy.privacy,
        final_metrics=final, elapsed_s=time.time() - started,
        failures=strategy.failures, out_dir=str(out_dir), data_dir=str(chain_dir), stopped=stopped,
    )
    if strategy.latest_arrays is not None:
        model.load_state_dict(strategy.latest_arrays.to_torch_state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".model.pt.tmp"
    torch.save(model.state_dict(), tmp)
    tmp.replace(out_dir / "model.pt")
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    _say(summary_table(results))
    _say(f"results: {out_dir / 'results.json'}")
    return results


def create_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the Flower run config with ``overrides`` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        run_chain(grid, cfg, run_name=f"run-{context.run_id}")

    return server_app


app = create_app()
