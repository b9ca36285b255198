"""Before round 1: the stores' explore releases, summed into the model's prior (DESIGN §5.3).

One Flower message of type ``query.explore`` per connected node; each store answers with its
DP release (:mod:`client.explore_release`, charged to its ledger) or a decline or refusal.
The sum of the releases becomes the global model's ``prior_item`` and ``prior_cat``
(:func:`server.explore_prior.prior_arrays`: post-processing, no ε). Stores that do not
answer add nothing; the run goes on with the rest (or with no prior when none answers).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.exchange import wire
from common.learning.model import Recommender
from server.explore_prior import prior_arrays, total_from_replies


def _outcome(reply: Message) -> tuple[str, object, float, str]:
    """(store, release or None, its σ_r, why not) of one reply."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        info = (wire.parse_refusal(reply.error.reason) or wire.parse_decline(reply.error.reason) or {})
        return str(info.get("store-id", f"node-{node}")), None, 0.0, str(info.get("reason", reply.error.reason))[:300]
    store = str(reply.content["store"].get("store-id", f"node-{node}")) if "store" in reply.content else f"node-{node}"
    records = reply.content.array_records
    if wire.EXPLORE_ARRAYS not in records or "release" not in records[wire.EXPLORE_ARRAYS]:
        return store, None, 0.0, "the reply carries no release"
    metrics = reply.content.metric_records.get("metrics", {})
    sigma = float(metrics.get("noise-multiplier", float("nan")))
    try:
        return store, records[wire.EXPLORE_ARRAYS]["release"].numpy(), sigma, ""
    except Exception as exc:  # a damaged payload: this store adds nothing
        return store, None, 0.0, f"the release cannot be decoded ({exc.__class__.__name__})"


def collect_prior(grid: Grid, model: Recommender, *, timeout: float) -> dict:
    """Ask every connected node for its release and set ``model``'s prior from their sum.
    Returns ``{"released": [stores], "failed": [{"store", "reason"}], "noise_std", "nodes": {node id: store}}``
    (``nodes``: who answered, so that the rounds can name a store that fails before its first reply)."""
    nodes = list(grid.get_node_ids())
    messages = [Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}),
                        message_type=wire.EXPLORE_MESSAGE, dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    length = model.n_items + model.prior_cat.numel()
    outcomes = [_outcome(r) for r in replies]
    total, noise_std, released, failed = total_from_replies(outcomes, length)
    answered = {r.metadata.src_node_id for r in replies}
    failed += [{"store": f"node-{n}", "reason": "no answer before the timeout"} for n in nodes if n not in answered]
    if released:
        prior_item, prior_cat = prior_arrays(total, model.n_items, model.prior_cat.shape[0])
        with torch.no_grad():
            model.prior_item.copy_(torch.from_numpy(prior_item))
            model.prior_cat.copy_(torch.from_numpy(prior_cat))
    nodes_named = {r.metadata.src_node_id: store for r, (store, *_) in zip(replies, outcomes)
                   if not store.startswith("node-")}
    return {"released": sorted(released), "failed": failed, "noise_std": noise_std, "nodes": nodes_named}
