"""Flower's FedAvg, observed: records what each store reported and prints a line per round.

Aggregation itself is Flower's. Before handing replies to it, each reply is reduced to
what aggregation needs (the arrays and the example count), because Flower rejects a whole
round when stores' metric keys differ (a store may withhold its non-DP loss).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from common import wire


def _store_id(msg: Message) -> str:
    if "store" in msg.content:
        return str(msg.content["store"].get("store-id", f"node-{msg.metadata.src_node_id}"))
    return f"node-{msg.metadata.src_node_id}"


class BudgetExhausted(Exception):
    """Every store declined a round: the run ends, cleanly, with what it has."""


class ObservedFedAvg(FedAvg):
    """FedAvg that keeps per-round counts, per-store privacy reports and evaluation metrics."""

    def __init__(self, *, num_rounds: int, printer: Callable[[str], None] = print, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds
        self.printer = printer
        self.rounds: list[dict] = []
        self.privacy: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.latest_arrays = None
        self._round_start = time.time()

    def configure_train(self, server_round, arrays, config, grid):
        self._round_start = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        entry = {"round": server_round, "participated": 0, "declined": 0, "failed": 0}
        for msg in replies:
            if msg.has_error():
                self._record_error(server_round, msg, entry)
                continue
            entry["participated"] += 1
            metrics = msg.content["metrics"]
            store = _store_id(msg)
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
            if "train-loss" in metrics:
                entry.setdefault("_losses", []).append((float(metrics["train-loss"]), int(metrics["num-examples"])))
            # Keep only what aggregation needs; every reply then has the same keys.
            msg.content = type(msg.content)({
                wire.TRAIN_ARRAYS: msg.content[wire.TRAIN_ARRAYS],
                "metrics": MetricRecord({"num-examples": int(metrics["num-examples"])}),
            })
        if self.privacy:
            entry["max_epsilon"] = max(p["epsilon"] for p in self.privacy.values())
        losses = entry.pop("_losses", [])
        if losses:
            total = sum(n for _, n in losses) or 1
            entry["train_loss"] = sum(loss * n for loss, n in losses) / total
        self.rounds.append(entry)
        if replies and entry["declined"] == len(replies):
            self.printer(progress_line(entry, self.num_rounds, self.privacy))
            raise BudgetExhausted(f"every store declined round {server_round}: their privacy budgets "
                                  "would be exceeded; no more training is possible at these settings")
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.latest_arrays = arrays
        return arrays, metrics

    def _record_error(self, server_round: int, msg: Message, entry: dict) -> None:
        decline = wire.parse_decline(msg.error.reason) if msg.error.code == wire.DECLINE_CODE else None
        if decline is None:
            entry["failed"] += 1
            self.failures.append({"round": server_round, "node": msg.metadata.src_node_id,
                                  "reason": msg.error.reason})
            self.printer(f"  store node {msg.metadata.src_node_id} failed in round {server_round}: "
                         f"{last_line(msg.error.reason)}")
            return
        entry["declined"] += 1
        store = str(decline.get("store-id", f"node-{msg.metadata.src_node_id}"))
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

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self.failures.append({"round": server_round, "node": msg.metadata.src_node_id,
                                      "reason": msg.error.reason, "phase": "evaluate"})
        metrics = super().aggregate_evaluate(server_round, replies)
        entry = self.rounds[-1] if self.rounds and self.rounds[-1]["round"] == server_round else {"round": server_round}
        entry["evaluated"] = sum(1 for m in replies if not m.has_error())
        if metrics is not None:
            entry["ndcg@10"] = float(metrics["ndcg@10"])
            entry["metrics"] = {k: float(v) for k, v in metrics.items()}
        entry["seconds"] = round(time.time() - self._round_start, 2)
        self.printer(progress_line(entry, self.num_rounds, self.privacy))
        return metrics


def last_line(text: str | None) -> str:
    """The last non-empty line of an error reason (a traceback's last line is its message)."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no reason given"


def progress_line(entry: dict, num_rounds: int, privacy: dict) -> str:
    """One human line per round: who trained, quality, worst ε so far, time."""
    eps = max((p["epsilon"] for p in privacy.values()), default=0.0)
    ndcg = f"{entry['ndcg@10']:.4f}" if "ndcg@10" in entry else "n/a"
    loss = f" · loss {entry['train_loss']:.3f}" if "train_loss" in entry else ""
    failed = f" · {entry['failed']} failed" if entry.get("failed") else ""
    failed += f" · {entry['declined']} declined" if entry.get("declined") else ""
    return (f"[round {entry['round']}/{num_rounds}] {entry.get('participated', 0)} stores trained{failed}"
            f"{loss} · NDCG@10 {ndcg} · max ε {eps:.2f} · {entry.get('seconds', 0):.1f}s")
