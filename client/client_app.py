"""Flower ClientApp of a store: Flower messages in, calls of plain functions, replies out.

What a reply may hold is fixed by :mod:`common.exchange.wire` (DESIGN §4.3). Training follows the
privacy order of DESIGN §4.2: read the ledger, decline if the round would exceed the
budget, train, write the event durably, and only then let the update leave.
"""

from __future__ import annotations

import secrets
import sys
import time
import warnings
import zlib
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.ledger import append_event, read_events
from client.run_authorization import RunNotAuthorized, authorize
from client.store import StoreNode, epsilon_budget, load_store, planned_noise, state_dir, store_label
from common.privacy import accountant as privacy
from common.exchange import update_codec
from common.exchange import wire
from common.config import RunConfig
from common.evaluation.evaluation import evaluate_audience, evaluate_baselines, evaluate_model
from common.privacy.ledger import LedgerError, PrivacyEvent
from common.data.storefiles import DataError
from common.learning.model import ModelConfig, Recommender
from common.learning.training import DPConfig, TrainConfig, sample_rate_for, steps_per_epoch, train_local

warnings.filterwarnings("ignore", message="Secure RNG turned off")
torch.set_num_threads(1)  # simulation runs one store per core; a store daemon may raise it


def _model(node: StoreNode, cfg: RunConfig, msg: Message) -> Recommender:
    model = Recommender(node.data.items, ModelConfig(dim=int(cfg["dim"]), hidden=int(cfg["hidden"])))
    model.load_state_dict(msg.content[wire.TRAIN_ARRAYS].to_torch_state_dict())
    return model


def _allow_local_metrics(context: Context, node: StoreNode) -> bool:
    """Non-DP values (loss, metrics) leave only where the node allows; default: simulation."""
    return bool(context.node_config.get("allow-local-metrics", node.simulated))


def _server_round(msg: Message) -> int:
    return int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0


def training_seed(node: StoreNode, cfg: RunConfig, server_round: int) -> int:
    """The seed of a round's sampling and noise.

    A deployed store draws it from the operating system: the noise and the Poisson batches
    must be unpredictable to the server, which knows the run config, or it could recreate
    the noise and subtract it. A simulation derives it from (seed, store, round), so that a
    run — and a resumed run — reproduces exactly; its randomness is public by construction,
    so a simulation demonstrates the accounting, it protects no one.
    """
    if not node.simulated:
        return secrets.randbits(62)
    return zlib.crc32(f"{cfg['seed']}|{node.store_id}|{server_round}".encode())


def send(reply: Message) -> Message:
    """The last step before a reply leaves the store (a seam for crash-injection tests)."""
    return reply


def _proximal_mu(msg: Message) -> float:
    """FedProx's μ, which Flower's FedProx puts in the train config."""
    if "config" in msg.content:
        return float(msg.content["config"].get("proximal-mu", 0.0))
    return 0.0


def handle_train(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train the global model on this store's members with DP-SGD; reply per DESIGN §4.3."""
    node = load_store(context.node_config, cfg)
    fault = injected_fault(node, context, cfg)
    if fault == "crash":
        raise RuntimeError(f"injected fault: store {node.store_id} crashed")
    if fault == "slow":
        time.sleep(float(cfg["fault-slow-s"]))
    reply = _train(msg, context, cfg, node)
    return send(misbehave(reply, fault) if fault in ("nan", "scale", "shape") else reply)


def injected_fault(node: StoreNode, context: Context, cfg: RunConfig) -> str:
    """The fault this store plays in a simulation (the first ``fault-stores`` stores), or ""."""
    if not node.simulated or not cfg["fault"] or int(cfg["fault-stores"]) <= 0:
        return ""
    if str(cfg["fault"]) not in FAULTS:
        raise ValueError(f"unknown fault '{cfg['fault']}'; use one of {', '.join(FAULTS)}")
    return str(cfg["fault"]) if int(context.node_config["partition-id"]) < int(cfg["fault-stores"]) else ""


FAULTS = ("nan", "scale", "shape", "crash", "slow")


def misbehave(reply: Message, fault: str) -> Message:
    """A faulty store's update: NaN values, a 1000× blown-up update, or a wrong shape."""
    if reply.has_error():
        return reply
    arrays = reply.content[wire.TRAIN_ARRAYS].to_torch_state_dict()
    name = next(iter(arrays))
    if fault == "nan":
        arrays[name] = arrays[name].clone().fill_(float("nan"))
    elif fault == "scale":
        arrays = {k: v * 1000.0 for k, v in arrays.items()}
    else:
        arrays[name] = arrays[name][..., :-1].clone()
    reply.content[wire.TRAIN_ARRAYS] = ArrayRecord(arrays)
    return reply


def _train(msg: Message, context: Context, cfg: RunConfig, node: StoreNode) -> Message:
    if not cfg["dp"]:
        return _train_without_dp(msg, context, cfg, node)
    accountant = str(cfg["accountant"])
    delta = node.delta(cfg)
    budget = epsilon_budget(node, context.node_config, cfg)
    ledger_dir = state_dir(node, context.node_config, cfg)
    events = read_events(ledger_dir, node.store_id)  # a bad ledger stops here, loudly
    history = [e.mechanism() for e in events]

    n, batch = node.data.n_train_members, int(cfg["batch-size"])
    sigma = planned_noise(node, cfg)
    q = sample_rate_for(n, batch)
    steps = int(cfg["local-epochs"]) * steps_per_epoch(n, batch)
    after = privacy.epsilon(history + [(sigma, q, steps)], delta, accountant)
    if after > budget:
        spent = privacy.epsilon(history, delta, accountant)
        reason = (f"training this round would bring ε from {spent:.3f} to {after:.3f}, "
                  f"over the store's budget {budget:g}")
        info = {"store-id": node.store_id, "epsilon": spent, "epsilon-after": after,
                "epsilon-budget": budget, "delta": delta, "accountant": accountant, "reason": reason}
        return Message(Error(code=wire.DECLINE_CODE, reason=wire.decline_reason(info)), reply_to=msg)

    model = _model(node, cfg, msg)
    server_round = _server_round(msg)
    train_cfg = TrainConfig(
        local_epochs=int(cfg["local-epochs"]), batch_size=batch, lr=float(cfg["dp-lr"]),
        optimizer=str(cfg["dp-optimizer"]), seed=training_seed(node, cfg, server_round),
        proximal_mu=_proximal_mu(msg), dp_path=str(cfg["dp-path"]),
    )
    result = train_local(model, node.data, train_cfg, DPConfig(sigma, float(cfg["clip-norm"])))
    event = PrivacyEvent(
        run_id=str(context.run_id), round=server_round, noise_multiplier=sigma, sample_rate=q,
        steps=result.steps, clip_norm=float(cfg["clip-norm"]), accountant=accountant,
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"), delta=delta,
    )
    # Durable before the update leaves: a crash from here on over-counts, never under-counts.
    events = append_event(ledger_dir, node.store_id, event)
    metrics = {
        "num-examples": result.examples,
        # The ledger now holds exactly the mechanism the budget check assumed, unless the
        # steps differ; then ε is recomputed from the ledger itself.
        "epsilon": after if result.steps == steps else privacy.epsilon([e.mechanism() for e in events], delta,
                                                                          accountant),
        "delta": delta,
        "noise-multiplier": sigma,
        "rounds-trained": sum(1 for e in events if e.run_id == str(context.run_id)),
        "epsilon-budget": budget,
    }
    if _allow_local_metrics(context, node):
        metrics["train-loss"] = result.loss
    return _train_reply(msg, model, metrics, node, accountant, cfg, train_cfg.seed)


def _train_without_dp(msg: Message, context: Context, cfg: RunConfig, node: StoreNode) -> Message:
    """Non-private training, for reference runs only: ε is reported as infinite."""
    model = _model(node, cfg, msg)
    server_round = _server_round(msg)
    train_cfg = TrainConfig(local_epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
                            lr=float(cfg["lr"]), seed=training_seed(node, cfg, server_round),
                            proximal_mu=_proximal_mu(msg))
    result = train_local(model, node.data, train_cfg, None)
    metrics = {"num-examples": result.examples, "epsilon": float("inf"), "delta": 0.0,
               "noise-multiplier": 0.0, "rounds-trained": server_round,
               "epsilon-budget": float("inf")}
    if _allow_local_metrics(context, node):
        metrics["train-loss"] = result.loss
    return _train_reply(msg, model, metrics, node, "none", cfg, train_cfg.seed)


def _train_reply(msg: Message, model: Recommender, metrics: dict, node: StoreNode, accountant: str,
                 cfg: RunConfig, seed: int) -> Message:
    encoding = str(cfg["update-encoding"])
    if encoding == "float32":
        arrays = ArrayRecord(model.state_dict())
    else:
        # Post-processing of the DP output against the (public) global model: see update_codec.
        sent = {k: v.numpy() for k, v in msg.content[wire.TRAIN_ARRAYS].items()}
        weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        encoded = update_codec.encode(weights, sent, encoding, np.random.default_rng(seed + 2))
        arrays = ArrayRecord({k: Array(v) for k, v in encoded.items()})
    content = RecordDict({
        wire.TRAIN_ARRAYS: arrays,
        "metrics": MetricRecord(metrics),
        "store": ConfigRecord({"store-id": node.store_id, "accountant": accountant}),
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
    audience = evaluate_audience(model, node.data)
    for prefix, key in (("audience", "model"), ("audience_pop", "member_pop")):
        metrics[f"{prefix}.auc"] = audience[key]["auc"]
        metrics[f"{prefix}.recall@100"] = audience[key]["recall@100"]
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "store": ConfigRecord({"store-id": node.store_id}),
    })
    return send(Message(content=content, reply_to=msg))


_BASELINE_CACHE: dict[str, dict] = {}


def _baselines(node: StoreNode) -> dict:
    """Baselines do not change between rounds: computed once per store and process."""
    key = str(node.store_dir)
    if key not in _BASELINE_CACHE:
        _BASELINE_CACHE[key] = evaluate_baselines(node.data)
    return _BASELINE_CACHE[key]


def refuse_when_unusable(msg: Message, context: Context, handler: Callable[[], Message]) -> Message:
    """``handler()``, or a refusal when the store's data or ledger cannot be used.

    A store with missing or invalid files, or a run its operator did not sign
    (client.run_authorization), must not train, and must not take its daemon down either: it replies with the reason (wire.REFUSE_CODE), which the server logs with the
    store's name, and it says the same in its own log. Other errors stay Flower's errors.
    """
    try:
        return handler()
    except (DataError, LedgerError, RunNotAuthorized) as exc:
        store = store_label(context.node_config)
        print(f"storefed: store {store} refuses {msg.metadata.message_type}: {exc}", file=sys.stderr, flush=True)
        return Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason(store, str(exc))), reply_to=msg)


def create_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is the Flower run config with ``overrides`` on top."""
    client_app = ClientApp()

    def config(context: Context) -> RunConfig:
        return RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})

    def authorized(context: Context, handler: Callable[[RunConfig], Message]) -> Callable[[], Message]:
        """The store's run authorization first, before the run config is used or any data read."""
        def run() -> Message:
            authorize(context.node_config, context.run_config, context.run_id)
            return handler(config(context))
        return run

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return refuse_when_unusable(msg, context, authorized(context, lambda cfg: handle_train(msg, context, cfg)))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return refuse_when_unusable(msg, context, authorized(context, lambda cfg: handle_evaluate(msg, context, cfg)))

    return client_app


app = create_app()
