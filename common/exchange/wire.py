"""Every value a store may send, by reply kind: DESIGN §4.3 as code.

The ClientApp builds its replies from these names only, and a test checks each reply
against them, so a new value cannot leave a store without a change here and in §4.3.
"""

from __future__ import annotations

from common.evaluation.metrics import METRIC_KEYS

# Train reply. "arrays": the model after local DP-SGD, (ε, δ)-DP per member, accounted —
# or, with run config update-encoding float16/int8, its update against the global model in
# that precision (int8 adds "<name>.scale" per row): post-processing, same (ε, δ); see
# common.exchange.update_codec. Never a selection of rows. When the server's model came packed
# (common.exchange.packing: one 1-D array per dtype, "packed:<dtype>", names sorted), the reply
# is packed the same way: the same values re-arranged, nothing added, the same (ε, δ).
TRAIN_ARRAYS = "arrays"
TRAIN_METRICS = (
    "num-examples",  # FedAvg weight: the store's published size, a setting; never the exact member count
    "epsilon",  # function of public settings (σ, q, steps, δ: all set by the published size), not of member data
    "delta",
    "noise-multiplier",
    "rounds-trained",
    "epsilon-budget",  # the store's ε_max: a setting
    "train-loss",  # NOT DP: sent only when the node allows local metrics
)
TRAIN_CONFIG = ("store-id", "accountant")

# The final global model, server → store, at the end of a run (server.delivery). The
# store's answer holds only its id and the content hash it kept (a function of the public
# global model): MODEL_ACK_CONFIG.
MODEL_MESSAGE = "query.model"
MODEL_ACK_CONFIG = ("store-id", "model-hash")

# The explore release (DESIGN §5.3), server → store once per run before round 1: the store
# answers with EXPLORE_ARRAYS = {"release": its per-member unit vectors (item popularity and
# category co-occurrence, client.explore_release) summed, plus Gaussian noise}: (ε, δ)-DP per
# member, charged to the store's ledger as round 0 of the run — and EXPLORE_METRICS, which
# like the train reply's are functions of public settings. Or a decline (DECLINE_KEYS).
EXPLORE_MESSAGE = "query.explore"
EXPLORE_ARRAYS = "explore-release"
EXPLORE_METRICS = ("epsilon", "delta", "noise-multiplier", "epsilon-budget")
EXPLORE_CONFIG = ("store-id",)

# Server → store, SIMULATION ONLY: in place of TRAIN_ARRAYS, {"sha256": digest} of the round's
# global model, which the simulation's worker fetches once per round from Ray's object store
# and puts back before the ClientApp sees the message (simulations.engine.model_ref). Not a value a
# store sends; a deployed store never reads a model from a location a message names: its
# ClientApp refuses a message carrying this (REFUSE_CODE) and reads nothing.
MODEL_REF = "model-ref"

BASELINES = ("store_pop", "p_topfreq")
# Audience ("goods find people"): mean ROC-AUC and recall@100 of ranking the store's members
# for its best sellers, by the model and by member popularity. Aggregates only, never lists.
AUDIENCE_METRICS = ("audience.auc", "audience.recall@100", "audience_pop.auc", "audience_pop.recall@100")
# Evaluate reply: NOT DP, sent only when the node allows local metrics (on in simulation).
# The unprefixed list metrics (and "audience.*") are those of the model the store serves: in
# the last round, the global model with the store-local layer (DESIGN §5.1), else the global
# model; "global_model.*" are the global model's alone. The layer itself is never sent.
EVAL_METRICS = (
    "num-examples",  # NOT DP: the exact number of members evaluated (weights the member-weighted means)
    *METRIC_KEYS,
    *(f"global_model.{k}" for k in METRIC_KEYS),
    *(f"{b}.{k}" for b in BASELINES for k in METRIC_KEYS),
    *AUDIENCE_METRICS,
)
EVAL_CONFIG = ("store-id",)

# Not a Flower reply: `storefed serve`'s campaign audience, POST /v1/audiences (DESIGN §5.4),
# answered to the chain's campaign tool so that it can merge the stores' lists. NOT DP: member
# ids and calibrated scores of the store's consenting home members (at most a quarter of them,
# client.serving.api.audience_limit). It must need an operator-signed request; that is NOT YET
# ENFORCED: today the store's serve bearer key is all that guards it.
SERVE_AUDIENCE_KEYS = ("objective", "members", "candidates_scored", "calibration", "limit", "unknown_items",
                       "unknown_items_first", "model", "local_layer")
SERVE_AUDIENCE_MEMBER_KEYS = ("member_id", "score")

# A store that declines a round replies with a Flower error carrying this code and a reason
# "storefed-decline {json}" whose keys are DECLINE_KEYS: no weights, nothing about members.
DECLINE_CODE = 1001
DECLINE_PREFIX = "storefed-decline "
DECLINE_KEYS = ("store-id", "epsilon", "epsilon-after", "epsilon-budget", "delta", "accountant", "reason")


def decline_reason(info: dict) -> str:
    """The error reason of a decline reply (keys: DECLINE_KEYS)."""
    import json

    unknown = set(info) - set(DECLINE_KEYS)
    if unknown:
        raise ValueError(f"not allowed in a decline: {sorted(unknown)}")
    return DECLINE_PREFIX + json.dumps(info, sort_keys=True)


# A store that cannot train at all (its data or ledger is missing or unusable, or the run
# asks for what the store's policy does not allow: client.policy) refuses with this code and
# a reason "storefed-refuse {json}" whose keys are REFUSE_KEYS. The reason names the store's
# file and the problem (a missing column, an unreadable ledger), the run-config setting and
# its allowed range, or why the store does not take part in the run
# (client/run_authorization.py, client/daemon/pinned_exec.py: unsigned, expired, replayed with the
# earlier run's id, another key, another app or version); the messages it comes from
# describe files, columns, settings and the run (a parser error gives line and field
# numbers), not member data. A refused model (client.client_app.checked_global) names the
# tensor and what is wrong with it (name, dtype, shape, byte length, a non-finite value): a
# function of the message and the public catalog, decided before any member data is read.
REFUSE_CODE = 1002
REFUSE_PREFIX = "storefed-refuse "
REFUSE_KEYS = ("store-id", "reason")
REFUSE_REASON_MAX = 600  # characters: enough for a file path and what is wrong with it


def refuse_reason(store_id: str, reason: str) -> str:
    """The error reason of a refusal: the store and why it cannot train (capped in length)."""
    import json

    text = " ".join(str(reason).split())
    if len(text) > REFUSE_REASON_MAX:
        text = text[:REFUSE_REASON_MAX - 1] + "…"
    return REFUSE_PREFIX + json.dumps({"store-id": str(store_id), "reason": text}, sort_keys=True)


def parse_refusal(reason: str | None) -> dict | None:
    """The refusal's content, or None when ``reason`` is not a storefed refusal."""
    return _parse_prefixed(reason, REFUSE_PREFIX)


def parse_decline(reason: str | None) -> dict | None:
    """The decline's content, or None when ``reason`` is not a storefed decline."""
    return _parse_prefixed(reason, DECLINE_PREFIX)


def _parse_prefixed(reason: str | None, prefix: str) -> dict | None:
    import json

    if not reason or not reason.startswith(prefix):
        return None
    try:
        info = json.loads(reason[len(prefix):])
    except json.JSONDecodeError:
        return None
    return info if isinstance(info, dict) else None
