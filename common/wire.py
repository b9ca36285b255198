"""Every value a store may send, by reply kind: DESIGN §4.3 as code.

The ClientApp builds its replies from these names only, and a test checks each reply
against them, so a new value cannot leave a store without a change here and in §4.3.
"""

from __future__ import annotations

from common.metrics import METRIC_KEYS

# Train reply. "arrays": the model after local DP-SGD, (ε, δ)-DP per member, accounted.
TRAIN_ARRAYS = "arrays"
TRAIN_METRICS = (
    "num-examples",  # NOT DP: training members (store size ±1); FedAvg weight
    "epsilon",  # function of public settings (σ, q, steps, δ), not of member data
    "delta",
    "noise-multiplier",
    "rounds-trained",
    "train-loss",  # NOT DP: sent only when the node allows local metrics
)
TRAIN_CONFIG = ("store-id",)

BASELINES = ("store_pop", "p_topfreq")
# Evaluate reply: NOT DP, sent only when the node allows local metrics (on in simulation).
EVAL_METRICS = (
    "num-examples",
    *METRIC_KEYS,
    *(f"{b}.{k}" for b in BASELINES for k in METRIC_KEYS),
)
EVAL_CONFIG = ("store-id",)
