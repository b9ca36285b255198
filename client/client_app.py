"""Flower ClientApp of a store: Flower messages in, calls of plain functions, replies out.

What a reply may hold is fixed by :mod:`common.wire` (DESIGN §4.3).
"""

from __future__ import annotations

import warnings
import zlib

from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.store import StoreNode, load_store, planned_noise
from common import privacy, wire
from common.config import RunConfig
from common.evaluation import evaluate_baselines, evaluate_model
from common.model import ModelConfig, Recommender
from common.training import DPConfig, TrainConfig, train_local

warnings.filterwarnings("ignore", message="Secure RNG turned off")
torch.set_num_threads(1)  # simulation runs one store per core; a store daemon may raise it

_PRIVACY_STATE = "storefed.privacy"


def _model(node: StoreNode, cfg: RunConfig, msg: Message) -> Recommender:
    model = Recommender(node.data.items, ModelConfig(dim=int(cfg["dim"]), hidden=int(cfg["hidden"])))
    model.load_state_dict(msg.content[wire.TRAIN_ARRAYS].to_torch_state_dict())
    return model


def _allow_local_metrics(context: Context, node: StoreNode) -> bool:
    """Non-DP values (loss, metrics) leave only where the node allows; default: simulation."""
    return bool(context.node_config.get("allow-local-metrics", node.simulated))


def _history(context: Context) -> list[tuple[float, float, int]]:
    """This run's DP mechanisms at this store: (σ, q, steps) per trained round."""
    if _PRIVACY_STATE not in context.state:
        return []
    rec = context.state[_PRIVACY_STATE]
    return list(zip(rec["sigma"], rec["q"], rec["steps"]))


def _save_history(context: Context, history: list[tuple[float, float, int]]) -> None:
    context.state[_PRIVACY_STATE] = ConfigRecord(
        {"sigma": [float(h[0]) for h in history], "q": [float(h[1]) for h in history],
         "steps": [int(h[2]) for h in history]}
    )


def handle_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train the global model on this store's members with DP-SGD; reply per DESIGN §4.3."""
    node = load_store(context.node_config, cfg)
    model = _model(node, cfg, msg)
    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    train_cfg = TrainConfig(
        local_epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["lr"]),
        seed=zlib.crc32(f"{cfg['seed']}|{node.store_id}|{server_round}".encode()),
    )
    dp = DPConfig(planned_noise(node, cfg), float(cfg["clip-norm"])) if cfg["dp"] else None
    result = train_local(model, node.data, train_cfg, dp)
    history = _history(context)
    if dp is not None:
        history.append((result.noise_multiplier, result.sample_rate, result.steps))
        _save_history(context, history)
    eps = privacy.epsilon(history, node.delta(cfg), str(cfg["accountant"])) if dp is not None else float("inf")
    metrics = {
        "num-examples": result.examples,
        "epsilon": eps,
        "delta": node.delta(cfg),
        "noise-multiplier": result.noise_multiplier,
        "rounds-trained": len(history) if dp is not None else server_round,
    }
    if _allow_local_metrics(context, node):
        metrics["train-loss"] = result.loss
    content = RecordDict({
        wire.TRAIN_ARRAYS: ArrayRecord(model.state_dict()),
        "metrics": MetricRecord(metrics),
        "store": ConfigRecord({"store-id": node.store_id}),
    })
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the global model (and the baselines) on this store's test split."""
    node = load_store(context.node_config, cfg)
    if not _allow_local_metrics(context, node):
        raise PermissionError(f"store {node.store_id} does not send evaluation metrics "
                              "(node config allow-local-metrics = false)")
    model = _model(node, cfg, msg)
    metrics = {"num-examples": len(node.data.eval_member_ids), **evaluate_model(model, node.data)}
    for name, values in _baselines(node).items():
        metrics.update({f"{name}.{k}": v for k, v in values.items()})
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "store": ConfigRecord({"store-id": node.store_id}),
    })
    return Message(content=content, reply_to=msg)


_BASELINE_CACHE: dict[str, dict] = {}


def _baselines(node: StoreNode) -> dict:
    """Baselines do not change between rounds: computed once per store and process."""
    key = str(node.store_dir)
    if key not in _BASELINE_CACHE:
        _BASELINE_CACHE[key] = evaluate_baselines(node.data)
    return _BASELINE_CACHE[key]


def create_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is the Flower run config with ``overrides`` on top."""
    client_app = ClientApp()

    def config(context: Context) -> RunConfig:
        return RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, config(context))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, config(context))

    return client_app


app = create_app()
