"""Flower ServerApp of the chain: start the run, FedAvg over the stores, report.

Glue only: configuration, the initial model and the results go through plain functions.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, RunConfig, cache_root
from common.data.dataset import ItemIndex
from common.learning.model import Recommender
from common.data.storefiles import atomic_write_bytes, atomic_write_text, ensure_generated_chain, read_catalog
from common.data.synth import default_spec
from common.learning.weights import weights_digest
from server.explore_round import collect_prior
from server.delivery import deliver_model
from server.report import build_results, summary_table
from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy import BudgetExhausted, make_strategy


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
    torch.manual_seed(cfg["seed"])
    items = ItemIndex.from_catalog(read_catalog(chain_dir))
    return Recommender(items, cfg.model_config())


def _iso(seconds: float) -> str:
    """A time (seconds since the epoch) in ISO-8601 UTC, to the second."""
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


class RunInterrupted(Exception):
    """The run config asked the server to stop after a round (to exercise --resume)."""


def strategy_options(cfg: RunConfig) -> dict:
    """Flower constructor arguments of the configured strategy, from the run config."""
    name = cfg["strategy"]
    options: dict = {}
    if name == "fedavgm":
        options["server_momentum"] = cfg["server-momentum"]
        if cfg["server-lr"] > 0:
            options["server_learning_rate"] = cfg["server-lr"]
    elif name in ("fedadam", "fedyogi") and cfg["server-lr"] > 0:
        options["eta"] = cfg["server-lr"]
    elif name == "fedprox":
        options["proximal_mu"] = cfg["proximal-mu"]
    elif name == "fedtrimmedavg":
        options["beta"] = cfg["trim-beta"]
    elif name in ("krum", "multikrum"):
        options["num_malicious_nodes"] = cfg["krum-malicious"]
    return options


def run_chain(grid: Grid, cfg: RunConfig, run_name: str) -> dict:
    """Train and evaluate over the connected stores; returns the results object."""
    started = time.time()
    chain_dir = cfg.chain_dir()
    if cfg.generated():
        if ensure_generated_chain(chain_dir, default_spec(cfg["stores"], cfg["seed"])):
            _say(f"generated the chain (seed {cfg['seed']}, {cfg['stores']} stores) at {chain_dir}")
    out_dir = Path(cfg["out-dir"]).expanduser() if cfg["out-dir"] else cache_root() / "runs" / run_name
    ckpt_dir = Path(cfg["checkpoint-dir"]).expanduser() if cfg["checkpoint-dir"] else out_dir / "checkpoint"
    config = dict(cfg.values)
    resumed = load_checkpoint(ckpt_dir, config) if cfg["resume"] else None
    if resumed is not None:
        run_name = resumed["run_name"]
        _say(f"resuming {run_name} after round {resumed['round']} from {ckpt_dir}")
    model = initial_model(cfg, chain_dir)
    if resumed is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in resumed["arrays"].items()})
    nodes = wait_for_nodes(grid, cfg["stores"], cfg["node-wait-s"])
    if nodes == 0:
        raise RuntimeError("no store node connected; start the SuperNodes (or raise num-supernodes)")
    if nodes < cfg["stores"]:
        _say(f"note: {nodes} store nodes connected, the chain has {cfg['stores']} stores; training "
             f"with {nodes}. For a simulation of the whole chain pass "
             f"--federation-config \"num-supernodes={cfg['stores']}\".")
    num_rounds = cfg["rounds"]
    done = resumed["round"] if resumed is not None else 0

    def on_round_end(server_round: int, arrays) -> None:
        if arrays is not None:
            model.load_state_dict(arrays.to_torch_state_dict())
        save_checkpoint(ckpt_dir, {
            "round": server_round, "run_name": run_name, "config": config,
            "arrays": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
            "strategy": cfg["strategy"], "strategy_state": strategy.state(),
            "rounds": strategy.rounds, "privacy": strategy.privacy, "failures": strategy.failures,
            "stores_by_node": strategy.stores_by_node,
        })
        if cfg["stop-after-round"] and server_round >= cfg["stop-after-round"]:
            raise RunInterrupted(f"stopped after round {server_round} as the run config asked "
                                 f"(stop-after-round); continue with --resume")

    _say(f"training {num_rounds - done} rounds over {nodes} stores with {cfg['strategy']} "
         f"({'DP-SGD, target ε ' + str(cfg['target-epsilon']) + ' per store' if cfg['dp'] else 'no DP'})")
    strategy = make_strategy(
        cfg["strategy"],
        num_rounds=num_rounds,
        printer=_say,
        min_stores=cfg["min-stores"],
        norm_factor=cfg["update-norm-factor"],
        round_offset=done,
        on_round_end=on_round_end,
        update_encoding=cfg["update-encoding"],
        fraction_train=cfg["fraction-train"],
        fraction_evaluate=cfg["fraction-evaluate"],
        # Flower waits, before each round, until this many nodes are online. A store whose
        # daemon died must not stall the chain: wait only for the fewest stores a round
        # needs; the stores that are online are sampled by the fractions above.
        min_train_nodes=max(1, cfg["min-stores"]),
        min_evaluate_nodes=max(1, cfg["min-stores"]),
        min_available_nodes=max(1, cfg["min-stores"]),
        **strategy_options(cfg),
    )
    if resumed is not None:
        strategy.restore(resumed["strategy_state"])
        strategy.rounds, strategy.privacy, strategy.failures = resumed["rounds"], resumed["privacy"], resumed["failures"]
        # A node that fails before it replies again is still named by its store.
        strategy.stores_by_node.update(resumed.get("stores_by_node", {}))
    explore = None
    if resumed is None and cfg["explore-prior-share"] > 0 and num_rounds > done:
        # Once per run, before round 1 (a resumed run has the prior in its checkpoint's model).
        explore = collect_prior(grid, model, timeout=cfg["round-timeout-s"])
        strategy.stores_by_node.update(explore.pop("nodes"))  # a store that fails round 1 is named, not numbered
        _say(f"explore prior from {len(explore['released'])} stores' DP releases"
             + (f"; {len(explore['failed'])} did not release: "
                + "; ".join(f"{f['store']}: {f['reason']}" for f in explore["failed"][:5]) if explore["failed"] else ""))
    stopped = None
    interrupted = False
    try:
        if num_rounds > done:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=num_rounds - done,
                timeout=cfg["round-timeout-s"],
                train_config=ConfigRecord({"run-name": run_name}),
            )
    except BudgetExhausted as exc:
        stopped = str(exc)
        _say(f"stopped: {stopped}")
        if cfg.generated():
            _say("to simulate again from a fresh privacy account, pass a new --state-dir "
                 "(storefed simulate) or run-config state-dir")
    except RunInterrupted as exc:
        interrupted = True  # to be resumed: the stores get the model of the finished run
        stopped = str(exc)
        _say(f"stopped: {stopped}")
    evaluated = [r for r in strategy.rounds if "metrics" in r]
    final = evaluated[-1]["metrics"] if evaluated else {}
    results = build_results(
        cfg=config, stores=nodes, rounds=strategy.rounds, privacy=strategy.privacy,
        final_metrics=final, elapsed_s=time.time() - started,
        failures=strategy.failures, out_dir=str(out_dir), data_dir=str(chain_dir), stopped=stopped,
    )
    results["strategy"] = cfg["strategy"]
    if explore is not None:
        results["explore_prior"] = explore
    # For the operator's dashboard: which run this is (the stores' ledgers name it by Flower's
    # run id, the number after "run-"), when, and which operator key signed it (None: unsigned).
    results["run_id"] = run_name
    results["started_at"] = _iso(started)
    results["finished_at"] = _iso(time.time())
    results["signed_by"] = cfg["operator-key-id"] or None
    results["checkpoint"] = {"dir": str(ckpt_dir), "round": evaluated[-1]["round"] if evaluated else done,
                             "resumed_from": resumed["round"] if resumed is not None else None}
    if strategy.latest_arrays is not None:
        model.load_state_dict(strategy.latest_arrays.to_torch_state_dict())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out_dir / "model.pt", buf.getvalue())
    if not interrupted:
        # Every store still connected keeps the final model for serving (DESIGN §5.2).
        final_round = max([int(r["round"]) for r in strategy.rounds] + [done])
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        results["delivery"] = deliver_model(grid, state, run_id=run_name, server_round=final_round,
                                            digest=weights_digest(state), timeout=cfg["round-timeout-s"])
        delivery = results["delivery"]
        _say(f"final model (hash {delivery['hash'][:12]}…) kept by {len(delivery['delivered'])} stores"
             + (f"; {len(delivery['failed'])} did not take it" if delivery["failed"] else ""))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    _say(summary_table(results))
    _say(f"results: {out_dir / 'results.json'}")
    return results


def create_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is the Flower run config with ``overrides`` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        except ConfigError as exc:  # e.g. clip-norm=-1, epsilon-budget=nan: no store is asked
            _say(f"storefed: run refused: {exc}")
            raise
        run_chain(grid, cfg, run_name=f"run-{context.run_id}")

    return server_app


app = create_app()
