"""Flower ClientApp of a store: Flower messages in, calls of plain functions, replies out.

What a reply may hold is fixed by :mod:`common.exchange.wire` (DESIGN §4.3). Training follows the
privacy order of DESIGN §4.2: under the store's ledger lock, check the budget (open
reservations count as spent) and reserve the round, or decline; train; commit the event
durably (or release the reservation if training failed); only then let the update leave.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
import zlib
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import dp_round
from client.policy import PolicyError
from client.policy import enforce as store_policy_for
from client.run_authorization import RunNotAuthorized, authorize
from client.serving import layers as layer_store
from client.state import evaluate_quota
from client.state.model_store import check_delivery, keep_model, read_info
from client.store import StoreNode, load_store, store_label
from common.config import ConfigError, RunConfig
from common.data.dataset import ItemIndex
from common.data.storefiles import DataError
from common.evaluation.evaluation import (audience_from_scores, evaluate_audience, evaluate_baselines, evaluate_scores,
                                         member_scores, model_scores)
from common.exchange import packing, update_codec, wire
from common.learning.local_layer import test_histories, training_member_histories
from common.learning.model import ModelConfig, Recommender
from common.learning.training import TrainConfig, train_local
from common.learning.weights import (ArraySpec, ModelFileError, check_array_specs, check_packed_spec, check_weights,
                                     weights_digest)
from common.privacy.ledger import LedgerError
from common.privacy.published_size import size_warning

warnings.filterwarnings("ignore", message="Secure RNG turned off")
torch.set_num_threads(1)  # simulation runs one store per core; a store daemon may raise it


# One model object per process for the last catalog and shape: each task loads the
# message's weights into it in place instead of building (and randomly initialising) a
# new one. Training seeds torch itself and every non-persistent buffer is refreshed before
# use, so results are bit-identical to a fresh model (tests/test_model_ref.py).
_MODEL: dict[tuple, Recommender] = {}


def _model_object(node: StoreNode, cfg: RunConfig) -> Recommender:
    """This process's model object for the store's catalog and the run's shape."""
    items, mcfg = node.data.items, cfg.model_config()
    # What shapes the model: its config, the catalog's size and each item's category and brand.
    key = (mcfg, items.n_items, items.n_categories, items.n_brands,
           zlib.crc32(np.ascontiguousarray(items.category).tobytes()), zlib.crc32(np.ascontiguousarray(items.brand).tobytes()))
    model = _MODEL.get(key)
    if model is None:
        _MODEL.clear()
        model = _MODEL[key] = Recommender(items, mcfg)
    return model


def _model(node: StoreNode, cfg: RunConfig, weights: Mapping[str, torch.Tensor]) -> Recommender:
    """The model object holding ``weights`` (already checked: :func:`checked_global`)."""
    model = _model_object(node, cfg)
    model.load_state_dict(weights)
    return model


# The names and ranks of the model's tensors, whatever the catalog: the structural check of
# a message's arrays runs on them before the store reads anything (see precheck_arrays).
_TENSOR_NAMES: tuple[str, ...] = tuple(Recommender(ItemIndex(
    item_ids=np.array(["x"]), category=np.zeros(1, np.int64), brand=np.zeros(1, np.int64),
    n_categories=1, n_brands=1), ModelConfig(dim=1, hidden=1)).state_dict())


def _array_specs(msg: Message) -> dict[str, ArraySpec]:
    """What the message says of each array of its model, without decoding any."""
    records = msg.content.array_records if msg.has_content() else {}
    if wire.TRAIN_ARRAYS not in records:
        raise ModelFileError(f"the message carries no model (no '{wire.TRAIN_ARRAYS}' arrays)")
    return {str(name): ArraySpec(str(arr.dtype), tuple(arr.shape), len(arr.data or b""))
            for name, arr in records[wire.TRAIN_ARRAYS].items()}


def is_packed(msg: Message) -> bool:
    """Whether the message's model is packed (common.exchange.packing); the reply then is too."""
    return (msg.has_content() and wire.TRAIN_ARRAYS in msg.content.array_records
            and packing.is_packed(msg.content.array_records[wire.TRAIN_ARRAYS]))


def precheck_arrays(msg: Message) -> None:
    """Names, dtypes and total size of the message's model, before the store reads its data.
    Raises ModelFileError (a refusal that spends nothing)."""
    if is_packed(msg):
        check_packed_spec(_array_specs(msg), None)
    else:
        check_array_specs(_array_specs(msg), dict.fromkeys(_TENSOR_NAMES))


def checked_global(msg: Message, node: StoreNode, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The message's global weights, checked against this store's catalog (untrusted input).

    Names, dtypes, shapes and byte lengths are checked from what the message says before any
    array is decoded; then each array is decoded (NumPy without pickles) and checked again,
    finite values included. Depends on the message and the public catalog only, never on
    member data, so a refusal tells the server nothing about members. Raises ModelFileError.
    """
    expected = {k: tuple(v.shape) for k, v in _model_object(node, cfg).state_dict().items()}
    layout = packing.layout_of(expected)  # this store's own layout: the message only gives a length
    packed = is_packed(msg)
    if packed:
        check_packed_spec(_array_specs(msg), sum(math.prod(shape) for _, _, shape in layout))
    else:
        check_array_specs(_array_specs(msg), expected)
    state = {}
    for name, arr in msg.content[wire.TRAIN_ARRAYS].items():
        try:
            state[name] = arr.numpy()
        except Exception as exc:  # a damaged .npy payload, or another serialisation
            raise ModelFileError(f"tensor '{name}' cannot be decoded ({exc.__class__.__name__})") from None
    if packed:
        try:
            state = packing.unpack(state, layout)
        except packing.PackingError as exc:
            raise ModelFileError(f"the packed model does not fit this store's catalog: {exc}") from None
    return check_weights(state, expected)


def _allow_local_metrics(context: Context, node: StoreNode) -> bool:
    """Non-DP values (loss, metrics) leave only where the node allows; default: simulation."""
    return bool(context.node_config.get("allow-local-metrics", node.simulated))


def _server_round(msg: Message) -> int:
    return int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0


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
    cfg = store_policy_for(msg, context.node_config, cfg)  # before any data is read
    precheck_arrays(msg)  # likewise: a foreign model is refused before anything is read or decoded
    node = load_store(context.node_config, cfg)
    # Before the reservation: a model that fails is refused and spends nothing.
    weights = checked_global(msg, node, cfg)
    fault = injected_fault(node, context, cfg)
    if fault == "crash":
        raise RuntimeError(f"injected fault: store {node.store_id} crashed")
    if fault == "slow":
        time.sleep(cfg["fault-slow-s"])
    keep_model_if_none(msg, context, cfg, node, weights, final=False)
    reply = _train(msg, context, cfg, node, weights)
    return send(misbehave(reply, fault) if fault in ("nan", "scale", "shape") else reply)


def injected_fault(node: StoreNode, context: Context, cfg: RunConfig) -> str:
    """The fault this store plays in a simulation (the first ``fault-stores`` stores), or ""."""
    if not node.simulated or not cfg["fault"] or cfg["fault-stores"] <= 0:
        return ""
    if cfg["fault"] not in FAULTS:
        raise ValueError(f"unknown fault '{cfg['fault']}'; use one of {', '.join(FAULTS)}")
    return cfg["fault"] if int(context.node_config["partition-id"]) < cfg["fault-stores"] else ""


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


def _train(msg: Message, context: Context, cfg: RunConfig, node: StoreNode,
           weights: Mapping[str, torch.Tensor]) -> Message:
    if not cfg["dp"]:
        return _train_without_dp(msg, context, cfg, node, weights)
    warn_size(node, node.published_size())
    outcome = dp_round.train_round(node, cfg, _model(node, cfg, weights), run_id=str(context.run_id),
                                   server_round=_server_round(msg), proximal_mu=_proximal_mu(msg))
    if isinstance(outcome, dp_round.Declined):
        return Message(Error(code=wire.DECLINE_CODE, reason=wire.decline_reason(outcome.info)), reply_to=msg)
    metrics = dict(outcome.metrics)
    if _allow_local_metrics(context, node):
        metrics["train-loss"] = outcome.loss
    return _train_reply(msg, outcome.model, weights, metrics, node, outcome.accountant, cfg, outcome.seed)


_SIZE_WARNED: set[str] = set()


def warn_size(node: StoreNode, published: int) -> None:
    """Say once per process, in the store's own log, when its real size is far from the
    published one (the message holds the exact count: it never goes into a reply)."""
    text = size_warning(node.data.n_train_members, published)
    if text and node.store_id not in _SIZE_WARNED:
        _SIZE_WARNED.add(node.store_id)
        print(f"storefed: store {node.store_id}: {text}", file=sys.stderr, flush=True)


def _train_without_dp(msg: Message, context: Context, cfg: RunConfig, node: StoreNode,
                      weights: Mapping[str, torch.Tensor]) -> Message:
    """Non-private training, for reference runs only: ε is reported as infinite."""
    model = _model(node, cfg, weights)
    server_round = _server_round(msg)
    train_cfg = TrainConfig(local_epochs=cfg["local-epochs"], batch_size=cfg["batch-size"],
                            lr=cfg["lr"], seed=dp_round.training_seed(node, cfg, server_round),
                            proximal_mu=_proximal_mu(msg))
    result = train_local(model, node.data, train_cfg, None)
    # Without DP nothing is private; the weight is still the published size where there is one.
    metrics = {"num-examples": node.published or result.examples, "epsilon": float("inf"), "delta": 0.0,
               "noise-multiplier": 0.0, "rounds-trained": server_round,
               "epsilon-budget": float("inf")}
    if _allow_local_metrics(context, node):
        metrics["train-loss"] = result.loss
    return _train_reply(msg, model, weights, metrics, node, "none", cfg, train_cfg.seed)


def _train_reply(msg: Message, model: Recommender, sent_model: Mapping[str, torch.Tensor], metrics: dict,
                 node: StoreNode, accountant: str, cfg: RunConfig, seed: int) -> Message:
    encoding = cfg["update-encoding"]
    if encoding == "float32" and not is_packed(msg):
        arrays = ArrayRecord(model.state_dict())
    else:
        # Post-processing of the DP output against the (public) global model: see update_codec.
        encoded = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        if encoding != "float32":
            sent = {k: v.numpy() for k, v in sent_model.items()}
            encoded = update_codec.encode(encoded, sent, encoding, np.random.default_rng(seed + 2))
        if is_packed(msg):  # as the global model came: the same values, a handful of Fleet objects
            encoded = packing.pack(encoded)
        arrays = ArrayRecord({k: Array(v) for k, v in encoded.items()})
    content = RecordDict({
        wire.TRAIN_ARRAYS: arrays,
        "metrics": MetricRecord(metrics),
        "store": ConfigRecord({"store-id": node.store_id, "accountant": accountant}),
    })
    return Message(content=content, reply_to=msg)


def handle_explore(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """The store's one explore release of the run (DESIGN §5.3), charged to its ledger."""
    cfg = store_policy_for(msg, context.node_config, cfg)  # before any data is read
    node = load_store(context.node_config, cfg)
    outcome = dp_round.release_round(node, cfg, run_id=str(context.run_id))
    if isinstance(outcome, dp_round.Declined):
        return Message(Error(code=wire.DECLINE_CODE, reason=wire.decline_reason(outcome.info)), reply_to=msg)
    content = RecordDict({
        wire.EXPLORE_ARRAYS: ArrayRecord({"release": Array(outcome.vector)}),
        "metrics": MetricRecord(outcome.metrics),
        "store": ConfigRecord({"store-id": node.store_id}),
    })
    return send(Message(content=content, reply_to=msg))


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the global model, the model the store serves (the global model with the store-local
    layer, fitted in the last round) and the baselines on this store's test split."""
    cfg = store_policy_for(msg, context.node_config, cfg)  # before any data is read
    precheck_arrays(msg)
    node = load_store(context.node_config, cfg)
    if not _allow_local_metrics(context, node):
        raise PermissionError(f"store {node.store_id} does not send evaluation metrics "
                              "(node config allow-local-metrics = false)")
    weights = checked_global(msg, node, cfg)  # a refused model uses none of the quota below
    # Not DP: bounded in how often and on how few members the store answers (client.state.evaluate_quota).
    cap, minimum = evaluate_quota.limits(context.node_config, deployed=not node.simulated)
    evaluate_quota.check_members(len(node.data.eval_member_ids), minimum)
    evaluate_quota.take(node.paths.state_dir, str(context.run_id), cap)
    keep_model_if_none(msg, context, cfg, node, weights, final=False)
    model = _model(node, cfg, weights)
    global_scores = model_scores(model, node.data)
    global_metrics = evaluate_scores(global_scores, node.data)
    metrics = {"num-examples": len(node.data.eval_member_ids), **global_metrics,
               **{f"global_model.{k}": v for k, v in global_metrics.items()}}
    for name, values in _baselines(node).items():
        metrics.update({f"{name}.{k}": v for k, v in values.items()})
    audience = evaluate_audience(model, node.data)
    for prefix, key in (("audience", "model"), ("audience_pop", "member_pop")):
        metrics[f"{prefix}.auc"] = audience[key]["auc"]
        metrics[f"{prefix}.recall@100"] = audience[key]["recall@100"]
    if cfg["local-layer"] and _server_round(msg) >= cfg["rounds"]:
        metrics.update(_served_metrics(node, model, global_scores))
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "store": ConfigRecord({"store-id": node.store_id}),
    })
    return send(Message(content=content, reply_to=msg))


def keep_model_if_none(msg: Message, context: Context, cfg: RunConfig, node: StoreNode,
                       weights: Mapping[str, torch.Tensor] | None = None, *, final: bool) -> None:
    """A store without a model keeps the global model a train or evaluate message carries.

    This is how a store that was offline when a run ended gets a model at its next contact.
    A train message of round 1 carries the run's initial (untrained) model: not kept.
    """
    if _server_round(msg) < 2 and msg.metadata.message_type.startswith("train"):
        return
    where = node.paths.state_dir
    if read_info(where) is not None:
        return
    if weights is None:
        weights = checked_global(msg, node, cfg)
    keep_model(where, weights, run_id=str(context.run_id), server_round=_server_round(msg),
               delivered_in_run=str(context.run_id),
               epsilon=dp_round.spent_epsilon(node, cfg), final=final)


def handle_model(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Keep the run's final global model for serving; answer with the hash kept."""
    cfg = store_policy_for(msg, context.node_config, cfg)  # as for train and evaluate
    precheck_arrays(msg)
    node = load_store(context.node_config, cfg)
    conf = msg.content["config"]
    claimed = str(conf.get("hash", ""))
    weights = checked_global(msg, node, cfg)
    if weights_digest(weights) != claimed:
        raise ValueError(f"store {node.store_id} refuses the final model: its hash differs from the one announced")
    where = node.paths.state_dir
    # One final model per run, checked before the layer is fitted on member data for it.
    check_delivery(where, claimed, str(context.run_id))
    if cfg["local-layer"]:  # kept before the model, so that serving finds both at once
        layer_store.keep_for_delivery(where, claimed,
                                      lambda: layer_store.layer_for(str(node.store_dir), _model(node, cfg, weights), node.data))
    info = keep_model(where, weights, run_id=str(conf.get("run-id", "")), delivered_in_run=str(context.run_id),
                      server_round=_server_round(msg),  # range-checked by the policy (≥ 0)
                      epsilon=dp_round.spent_epsilon(node, cfg), final=True)
    content = RecordDict({"store": ConfigRecord({"store-id": node.store_id, "model-hash": info["hash"]})})
    return send(Message(content=content, reply_to=msg))


def _served_metrics(node: StoreNode, model: Recommender, global_scores: np.ndarray) -> dict:
    """The store-local layer's step (DESIGN §5.1): fit it on the final global model, at the store,
    and measure the model the store serves. Its values replace the unprefixed `model` metrics;
    the layer itself stays in this process (client.serving.layers), never in a reply."""
    layer = layer_store.layer_for(str(node.store_dir), model, node.data)
    served = evaluate_scores(layer.scores(global_scores, test_histories(node.data)), node.data)
    members = training_member_histories(node.data)
    audience = audience_from_scores(layer.scores(member_scores(model, node.data), members), node.data)
    return {**served, "audience.auc": audience["auc"], "audience.recall@100": audience["recall@100"]}


_BASELINE_CACHE: dict[str, dict] = {}


def _baselines(node: StoreNode) -> dict:
    """Baselines do not change between rounds: computed once per store and process."""
    key = str(node.store_dir)
    if key not in _BASELINE_CACHE:
        _BASELINE_CACHE[key] = evaluate_baselines(node.data)
    return _BASELINE_CACHE[key]


def refuse_when_unusable(msg: Message, context: Context, handler: Callable[[], Message]) -> Message:
    """``handler()``, or a refusal when the store's data or ledger cannot be used, or the run
    asks for what the store's policy does not allow (client.policy).

    A store with missing or invalid files, or a run its operator did not sign
    (client.run_authorization), must not train, and must not take its daemon down either:
    it replies with the reason (wire.REFUSE_CODE), which the server logs with the store's
    name, and it says the same in its own log. Other errors stay Flower's errors.
    A message that names a global model (``wire.MODEL_REF``) instead of carrying it is
    refused before anything is read: only a simulation's worker resolves such a name.
    """
    if msg.has_content() and wire.MODEL_REF in msg.content:
        # Only a simulation's worker resolves such a reference, before the ClientApp runs
        # (simulations.engine.model_ref): a store reads no model from a location a message names.
        store = store_label(context.node_config)
        reason = (f"the message names a global model ({wire.MODEL_REF}) instead of carrying its arrays; "
                  "a store takes a model only inside the message, and nothing was read")
        print(f"storefed: store {store} refuses {msg.metadata.message_type}: {reason}", file=sys.stderr, flush=True)
        return Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason(store, reason)), reply_to=msg)
    try:
        return handler()
    except (DataError, LedgerError, PolicyError, ConfigError, RunNotAuthorized, ModelFileError) as exc:
        store = store_label(context.node_config)
        print(f"storefed: store {store} refuses {msg.metadata.message_type}: {exc}", file=sys.stderr, flush=True)
        return Message(Error(code=wire.REFUSE_CODE, reason=wire.refuse_reason(store, str(exc))), reply_to=msg)


def reply_state_dir(context: Context, overrides: Mapping[str, Any] | None = None):
    """The state directory where this node's reply log goes, or None when it cannot be told
    without trusting the run: a deployed store's own (node config), a simulated store's as
    the run's settings place it."""
    from client.state.paths import StorePaths, own_state_dir

    if "store-dir" in context.node_config or context.node_config.get("state-dir"):
        return own_state_dir(context.node_config)  # never a directory the run config names
    try:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        return StorePaths.of_node(context.node_config, cfg).state_dir
    except Exception:  # a run config or partition that does not resolve: nothing to log into
        return None


def _array_size(reply: Message) -> tuple[int, int] | None:
    """(tensors, bytes) of the model, update or explore release a reply carries; None when it
    carries none."""
    if reply.has_error() or not reply.has_content():
        return None
    for name in (wire.TRAIN_ARRAYS, wire.EXPLORE_ARRAYS):
        if name in reply.content.array_records:
            arrays = reply.content.array_records[name]
            return len(arrays), sum(len(a.data or b"") for a in arrays.values())
    return None


def log_reply(msg: Message, context: Context, reply: Message | None, *, signed_by: str | None = None,
              failure: BaseException | None = None, overrides: Mapping[str, Any] | None = None) -> None:
    """Write what leaves the store in its reply log (client.state.reply_log) before it goes.
    Never changes the reply: a log that cannot be written is said in the store's log."""
    from client.state import reply_log

    try:
        state = reply_state_dir(context, overrides)
        if state is None:
            return
        try:
            server_round = _server_round(msg)
        except Exception:
            server_round = 0
        common = {"message": msg.metadata.message_type, "run_id": str(context.run_id), "server_round": server_round,
                  "signed_by": signed_by}
        if failure is not None:
            item = reply_log.entry(outcome="failed", reason=f"{failure.__class__.__name__}: {failure}", **common)
        elif reply.has_error():
            decline = wire.parse_decline(reply.error.reason) if reply.error.code == wire.DECLINE_CODE else None
            refusal = wire.parse_refusal(reply.error.reason) if reply.error.code == wire.REFUSE_CODE else None
            found = decline if decline is not None else refusal
            if found is not None:
                item = reply_log.entry(outcome="declined" if decline is not None else "refused", values=found,
                                       reason=str(found.get("reason", "")), **common)
            else:
                item = reply_log.entry(outcome="failed", reason=str(reply.error.reason), **common)
        else:
            values: dict = {}
            for name in ("metrics", "store"):
                if name in reply.content:
                    values.update(dict(reply.content[name]))
            item = reply_log.entry(outcome="sent", values=values, arrays=_array_size(reply), **common)
        reply_log.record(state, item)
    except Exception as exc:  # the log describes; it must never stop a reply
        print(f"storefed: the reply log could not be written ({exc.__class__.__name__}: {exc})", file=sys.stderr,
              flush=True)


def create_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is the Flower run config with ``overrides`` on top."""
    client_app = ClientApp()

    def config(context: Context) -> RunConfig:
        return RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})

    def authorized(context: Context, handler: Callable[[RunConfig], Message], signed: dict) -> Callable[[], Message]:
        """The store's run authorization first, before the run config is used or any data read."""
        def run() -> Message:
            auth = authorize(context.node_config, context.run_config, context.run_id)
            if auth is not None:
                signed["key_id"] = auth.key_id
            return handler(config(context))
        return run

    def answer(msg: Message, context: Context, handler: Callable[[RunConfig], Message]) -> Message:
        """The reply, logged (client.state.reply_log) before it leaves."""
        signed: dict = {}
        try:
            reply = refuse_when_unusable(msg, context, authorized(context, handler, signed))
        except BaseException as exc:
            log_reply(msg, context, None, signed_by=signed.get("key_id"), failure=exc, overrides=overrides)
            raise
        log_reply(msg, context, reply, signed_by=signed.get("key_id"), overrides=overrides)
        return reply

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return answer(msg, context, lambda cfg: handle_train(msg, context, cfg))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer(msg, context, lambda cfg: handle_evaluate(msg, context, cfg))

    @client_app.query(wire.MODEL_MESSAGE.split(".")[1])
    def model(msg: Message, context: Context) -> Message:
        # The kept model is what the store serves: only a run its operator signed may place it.
        return answer(msg, context, lambda cfg: handle_model(msg, context, cfg))

    @client_app.query(wire.EXPLORE_MESSAGE.split(".")[1])
    def explore(msg: Message, context: Context) -> Message:
        return answer(msg, context, lambda cfg: handle_explore(msg, context, cfg))

    return client_app


app = create_app()
