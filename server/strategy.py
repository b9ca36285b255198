"""Flower's strategies, observed and guarded: the glue between Flower and our checks.

Aggregation itself is always Flower's (FedAvg, FedAvgM, FedAdam, FedYogi, FedProx,
FedMedian, FedTrimmedAvg, Krum, MultiKrum). :class:`ObserverMixin` goes in front of one of
them and, each round:

* records what each store reported (privacy, declines, failures) and prints one line;
* rejects updates that do not fit the model, hold NaN/Inf or are far larger than the
  round's others (:mod:`server.update_checks`), and skips the round when fewer than
  ``min_stores`` updates remain;
* reduces each reply to what aggregation needs (arrays and example count), because Flower
  rejects a whole round when stores' metric keys differ;
* shifts round numbers by ``round_offset`` when a run resumes from a checkpoint, and hands
  the round's end to ``on_round_end`` (which saves the checkpoint).
"""

from __future__ import annotations

import copy
import re
import time
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flower

from common.exchange import packing, update_codec
from common.exchange import wire
from server.update_checks import check_updates

class MultiKrumOfEachRound(flower.MultiKrum):
    """Multi-Krum as its paper states it: of a round's n accepted updates, average the n − f
    with the best Krum scores (f = ``num_malicious_nodes``). Flower's MultiKrum takes a fixed
    ``num_nodes_to_select`` whose default, 1, makes it Krum; a count given here stays fixed."""

    def __init__(self, *, num_nodes_to_select: int = 0, **kwargs) -> None:
        super().__init__(num_nodes_to_select=max(1, num_nodes_to_select), **kwargs)
        self.per_round = num_nodes_to_select <= 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if self.per_round:
            n = sum(1 for m in replies if not m.has_error())
            self.num_nodes_to_select = max(1, n - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


STRATEGIES = {
    "fedavg": flower.FedAvg,
    "fedavgm": flower.FedAvgM,
    "fedadam": flower.FedAdam,
    "fedyogi": flower.FedYogi,
    "fedprox": flower.FedProx,
    "fedmedian": flower.FedMedian,
    "fedtrimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
    "multikrum": MultiKrumOfEachRound,
}
# Server-side state that a checkpoint must carry for an exact resume.
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


def packed_arrays(arrays: ArrayRecord) -> ArrayRecord:
    """The model as one array per dtype (common.exchange.packing): a handful of Fleet
    objects per message instead of one per tensor."""
    if packing.is_packed(arrays):
        return arrays
    return ArrayRecord({k: Array(v) for k, v in packing.pack({k: a.numpy() for k, a in arrays.items()}).items()})


def packed_messages(messages: Iterable[Message]) -> list[Message]:
    """``messages`` with their model packed; a record that several messages share is packed once."""
    messages, done = list(messages), {}
    for msg in messages:
        if not msg.has_content() or wire.TRAIN_ARRAYS not in msg.content.array_records:
            continue
        record = msg.content[wire.TRAIN_ARRAYS]
        if id(record) not in done:
            done[id(record)] = packed_arrays(record)
        msg.content[wire.TRAIN_ARRAYS] = done[id(record)]
    return messages


def _store_id(msg: Message) -> str:
    if "store" in msg.content:
        return str(msg.content["store"].get("store-id", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


class BudgetExhausted(Exception):
    """Every store declined a round: the run ends, cleanly, with what it has."""


class ObserverMixin:
    """Put in front of a Flower strategy class; see the module docstring."""

    def __init__(self, *, num_rounds: int, printer: Callable[[str], None] = print, min_stores: int = 1,
                 norm_factor: float = 10.0, round_offset: int = 0,
                 on_round_end: Callable[[int, ArrayRecord | None], None] | None = None,
                 update_encoding: str = "float32", **kwargs) -> None:
        super().__init__(**kwargs)
        self.update_encoding = update_encoding
        self.num_rounds = num_rounds
        self.printer = printer
        self.min_stores = min_stores
        self.norm_factor = norm_factor
        self.round_offset = round_offset
        self.on_round_end = on_round_end
        self.rounds: list[dict] = []
        self.privacy: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.latest_arrays: ArrayRecord | None = None
        self._sent: dict | None = None
        self._asked: list[Message] = []
        self.stores_by_node: dict[int, str] = {}  # node id → store id, from the stores' replies
        self._round_start = time.time()

    def state(self) -> dict[str, Any]:
        """The strategy's server-side state (e.g. FedAdam's moments), for a checkpoint."""
        return {a: copy.deepcopy(getattr(self, a)) for a in STATE_ATTRIBUTES if getattr(self, a, None) is not None}

    def restore(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name not in STATE_ATTRIBUTES:
                raise ValueError(f"checkpoint holds unknown strategy state '{name}'")
            setattr(self, name, value)

    def configure_train(self, server_round, arrays, config, grid):
        self._round_start = time.time()
        self._sent = {k: v.numpy() for k, v in arrays.items()}
        # Kept to tell, after the round, which node each reply answers (an error that the
        # SuperLink writes for a vanished node comes from the SuperLink, not from the node)
        # and which nodes did not answer at all.
        self._asked = packed_messages(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        return self._asked

    def configure_evaluate(self, server_round, arrays, config, grid):
        return packed_messages(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        entry = {"round": server_round, "participated": 0, "declined": 0, "failed": 0, "rejected": 0}
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self._asked if m.metadata.message_id}
        did: dict[str, list[str]] = {}
        for msg in replies:
            node = node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                outcome, store = self._record_error(server_round, msg, entry, node)
                did.setdefault(outcome, []).append(store)
                continue
            entry["participated"] += 1
            metrics = msg.content["metrics"]
            store = _store_id(msg)
            self.stores_by_node[node] = store
            did.setdefault("trained", []).append(store)
            self.privacy[store] = {
                **self.privacy.get(store, {"declined_rounds": 0}),
                "epsilon": float(metrics["epsilon"]),
                "delta": float(metrics["delta"]),
                "noise_multiplier": float(metrics["noise-multiplier"]),
                "rounds_trained": int(metrics["rounds-trained"]),
                "budget": float(metrics["epsilon-budget"]),
                "accountant": str(msg.content["store"].get("accountant", "")),
                "members": int(metrics["num-examples"]),
            }
            # What the store sent, as Flower puts it on the wire (arrays, metrics, config).
            entry["bytes_received"] = entry.get("bytes_received", 0) + reply_bytes(msg)
            if "train-loss" in metrics:
                entry.setdefault("_losses", []).append((float(metrics["train-loss"]), int(metrics["num-examples"])))
            # Keep only what aggregation needs; every reply then has the same keys.
            msg.content = type(msg.content)({
                wire.TRAIN_ARRAYS: self._decoded(msg.content[wire.TRAIN_ARRAYS]),
                "metrics": MetricRecord({"num-examples": int(metrics["num-examples"])}),
            })
        if self.privacy:
            entry["max_epsilon"] = max(p["epsilon"] for p in self.privacy.values())
        losses = entry.pop("_losses", [])
        if losses:
            total = sum(n for _, n in losses) or 1
            entry["train_loss"] = sum(loss * n for loss, n in losses) / total
        answered = {m.metadata.reply_to_message_id for m in replies}
        for node in (n for mid, n in node_of.items() if mid not in answered):
            entry["failed"] += 1
            store = self.store_name(node)
            self.failures.append({"round": server_round, "node": node, "store": store, "phase": "train",
                                  "reason": "no reply within the round timeout (round-timeout-s)"})
            self.printer(f"  store {store} failed in round {server_round}: no reply within the round timeout")
            did.setdefault("failed", []).append(store)
        self.rounds.append(entry)
        self.printer(who_did_what(server_round, did))
        # Per store, what it did this round (the dashboard's table); reasons are in failures
        # (refused, failed, rejected) and here for a decline, which is no failure.
        entry["stores"] = {what: sorted(stores) for what, stores in sorted(did.items())}
        if replies and entry["declined"] == len(replies):
            self.printer(progress_line(entry, self.num_rounds, self.privacy))
            raise BudgetExhausted(f"every store declined round {server_round}: their privacy budgets "
                                  "would be exceeded; no more training is possible at these settings")
        # Aggregate in a fixed order (by store): float sums then do not depend on which
        # store's reply arrived first, so a run reproduces bit for bit.
        ordered = sorted((m for m in replies if not m.has_error()),
                         key=lambda m: self.stores_by_node.get(m.metadata.src_node_id, ""))
        accepted = self._reject_bad_updates(server_round, ordered, entry)
        if entry.get("_rejected"):
            entry["stores"]["rejected"] = sorted(entry.pop("_rejected"))
        if len(accepted) < self.min_stores:
            self.printer(f"  round {server_round} skipped: {len(accepted)} acceptable updates, "
                         f"{self.min_stores} needed; the global model stays as it was")
            entry["skipped"] = True
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None:
            # Server optimizers (FedAdam, FedYogi) compute in float64; the model is float32,
            # and stores' replies are checked against what was sent, so keep its dtypes.
            if self._sent:
                arrays = ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=self._sent[k].dtype))
                                      for k, v in arrays.items()})
            self.latest_arrays = arrays
        return arrays, metrics

    def _decoded(self, arrays: ArrayRecord) -> ArrayRecord:
        """The store's weights from its (possibly packed, possibly compressed) update; a
        malformed one is passed on as it came, and the update checks then reject it with
        the reason."""
        if not self._sent or (self.update_encoding == "float32" and not packing.is_packed(arrays)):
            return arrays
        try:
            got = {k: v.numpy() for k, v in arrays.items()}
            if packing.is_packed(got):
                got = packing.unpack(got, update_codec.encoded_layout(self._sent, self.update_encoding))
            weights = update_codec.decode(got, self._sent, self.update_encoding)
        except (ValueError, KeyError, TypeError):
            return arrays
        return ArrayRecord({k: Array(v) for k, v in weights.items()})

    def _reject_bad_updates(self, server_round: int, replies: list[Message], entry: dict) -> list[Message]:
        updates = [{k: v.numpy() for k, v in m.content[wire.TRAIN_ARRAYS].items()} for m in replies]
        reasons = check_updates(self._sent, updates, self.norm_factor) if self._sent else [None] * len(updates)
        accepted = []
        for msg, reason in zip(replies, reasons):
            if reason is None:
                accepted.append(msg)
                continue
            entry["rejected"] += 1
            store = self.store_name(msg.metadata.src_node_id)
            entry.setdefault("_rejected", []).append(store)
            self.failures.append({"round": server_round, "node": msg.metadata.src_node_id, "store": store,
                                  "reason": f"rejected: {reason}", "phase": "validation"})
            self.printer(f"  update of store {store} rejected in round {server_round}: {reason}")
        return accepted

    def store_name(self, node: int) -> str:
        """The store behind a node id, once it has replied; else the node id."""
        return self.stores_by_node.get(node, f"node-{node}")

    def _record_error(self, server_round: int, msg: Message, entry: dict, node: int) -> tuple[str, str]:
        """Count and log an error reply; returns (what the store did, the store's name)."""
        code, reason = msg.error.code, msg.error.reason
        decline = wire.parse_decline(reason) if code == wire.DECLINE_CODE else None
        refusal = wire.parse_refusal(reason) if code == wire.REFUSE_CODE else None
        if decline is None:
            entry["failed"] += 1
            if refusal is not None:
                store, outcome = str(refusal.get("store-id", self.store_name(node))), "refused"
                why = str(refusal.get("reason", "no reason given"))
                self.stores_by_node.setdefault(node, store)
                self.printer(f"  store {store} refused round {server_round} (it cannot train): {why}")
            else:
                store, why, outcome = self.store_name(node), last_line(reason), "failed"
                self.printer(f"  store {store} failed in round {server_round}: {why}")
            self.failures.append({"round": server_round, "node": node, "store": store, "phase": "train",
                                  "reason": f"refused: {why}" if refusal is not None else why})
            return outcome, store
        entry["declined"] += 1
        store = str(decline.get("store-id", self.store_name(node)))
        self.stores_by_node.setdefault(node, store)
        previous = self.privacy.get(store, {"rounds_trained": 0, "noise_multiplier": 0.0, "declined_rounds": 0})
        self.privacy[store] = {
            **previous,
            "epsilon": float(decline["epsilon"]),
            "delta": float(decline["delta"]),
            "budget": float(decline["epsilon-budget"]),
            "accountant": str(decline["accountant"]),
            "declined_rounds": previous.get("declined_rounds", 0) + 1,
        }
        self.printer(f"  store {store} declined round {server_round}: {decline.get('reason', '')}")
        entry.setdefault("declines", {})[store] = str(decline.get("reason", ""))
        return "declined", store

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                refusal = wire.parse_refusal(msg.error.reason) if msg.error.code == wire.REFUSE_CODE else None
                why = f"refused: {refusal.get('reason')}" if refusal else last_line(msg.error.reason)
                self.failures.append({"round": server_round, "node": msg.metadata.src_node_id,
                                      "store": self.store_name(msg.metadata.src_node_id), "reason": why,
                                      "phase": "evaluate"})
        metrics = super().aggregate_evaluate(server_round, replies)
        entry = self.rounds[-1] if self.rounds and self.rounds[-1]["round"] == server_round else {"round": server_round}
        entry["evaluated"] = sum(1 for m in replies if not m.has_error())
        if metrics is not None:
            entry["ndcg@10"] = float(metrics["ndcg@10"])
            entry["metrics"] = {k: float(v) for k, v in metrics.items()}
        entry["seconds"] = round(time.time() - self._round_start, 2)
        # When (seconds since the epoch), so that a benchmark can charge the processes' CPU to the round.
        entry["window"] = [round(self._round_start, 3), round(time.time(), 3)]
        self.printer(progress_line(entry, self.num_rounds, self.privacy))
        if self.on_round_end is not None:
            self.on_round_end(server_round, self.latest_arrays)
        return metrics


def reply_bytes(msg: Message) -> int:
    """Size of a reply's content in Flower's wire format (protobuf), in bytes."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(msg.content).ByteSize()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_line(text: str | None) -> str:
    """The last non-empty line of an error reason (a traceback's last line is its message),
    without terminal colour codes."""
    lines = [line for line in _ANSI.sub("", text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no reason given"


def who_did_what(server_round: int, did: dict[str, list[str]]) -> str:
    """One log line per round naming the stores by what they did, e.g.
    ``  round 2: trained S001, S002 · failed S003``."""
    order = ("trained", "declined", "refused", "failed")
    parts = [f"{what} {', '.join(sorted(did[what]))}" for what in order if did.get(what)]
    return f"  round {server_round}: " + (" · ".join(parts) if parts else "no store replied")


def progress_line(entry: dict, num_rounds: int, privacy: dict) -> str:
    """One human line per round: who trained, quality, worst ε so far, time."""
    eps = max((p["epsilon"] for p in privacy.values()), default=0.0)
    ndcg = f"{entry['ndcg@10']:.4f}" if "ndcg@10" in entry else "n/a"
    loss = f" · loss {entry['train_loss']:.3f}" if "train_loss" in entry else ""
    failed = f" · {entry['failed']} failed" if entry.get("failed") else ""
    failed += f" · {entry['declined']} declined" if entry.get("declined") else ""
    failed += f" · {entry['rejected']} rejected" if entry.get("rejected") else ""
    return (f"[round {entry['round']}/{num_rounds}] {entry.get('participated', 0)} stores trained{failed}"
            f"{loss} · NDCG@10 {ndcg} · max ε {eps:.2f} · {entry.get('seconds', 0):.1f}s")


def make_strategy(name: str, **kwargs) -> ObserverMixin:
    """An observed instance of Flower's strategy ``name`` (see STRATEGIES)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    base = STRATEGIES[name]
    cls = type(f"Observed{base.__name__}", (ObserverMixin, base), {})
    return cls(**kwargs)
