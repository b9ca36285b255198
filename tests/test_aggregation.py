"""Aggregation through Flower's strategies, checked against numbers computed by hand or numpy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from common.exchange.update_checks import check_updates
from server.strategy import STRATEGIES, make_strategy
from simulations.cli import STRATEGY_NAMES


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def reply(arrays: dict, n: int, store: str = "S") -> Message:
    sent = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=MessageType.TRAIN)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n, "epsilon": 1.0, "delta": 1e-6, "noise-multiplier": 1.0,
                                 "rounds-trained": 1, "epsilon-budget": 8.0}),
        "store": ConfigRecord({"store-id": store, "accountant": "prv"}),
    })
    return Message(content=content, reply_to=sent)


def aggregate(name: str, updates: list[dict], weights: list[int], global_arrays: dict | None = None, **options):
    strategy = make_strategy(name, num_rounds=1, printer=lambda _: None, norm_factor=0.0, **options)
    reference = global_arrays or {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in updates[0].items()}
    strategy._sent = reference
    if hasattr(strategy, "current_arrays"):  # FedOpt and FedAvgM keep what they sent
        record = ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in reference.items()})
        strategy.current_arrays = ({k: np.asarray(v, dtype=np.float64) for k, v in reference.items()}
                                   if name in ("fedadam", "fedyogi") else record)
    arrays, _ = strategy.aggregate_train(1, [reply(u, w, f"S{i}") for i, (u, w) in enumerate(zip(updates, weights))])
    return {k: v.numpy() for k, v in arrays.items()}


def test_every_strategy_of_the_issue_is_selectable():
    assert set(STRATEGY_NAMES) == set(STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd", num_rounds=1)


def test_fedavg_is_the_hand_computed_weighted_mean():
    out = aggregate("fedavg", [{"w": [1, 2, 3]}, {"w": [4, 5, 6]}, {"w": [10, 0, -2]}], [1, 2, 1])
    # (1·[1,2,3] + 2·[4,5,6] + 1·[10,0,-2]) / 4
    assert out["w"].tolist() == [19 / 4, 12 / 4, 13 / 4]


arrays_st = st.lists(st.integers(-50, 50), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(arrays_st, st.integers(1, 20)), min_size=2, max_size=6), st.randoms())
def test_fedavg_properties(stores, random):
    updates = [{"w": u} for u, _ in stores]
    weights = [w for _, w in stores]
    out = aggregate("fedavg", updates, weights)["w"]
    expected = np.average(np.array([u for u, _ in stores], dtype=float), axis=0, weights=weights)
    assert np.allclose(out, expected)
    # Equal weights: the plain mean.
    assert np.allclose(aggregate("fedavg", updates, [3] * len(updates))["w"], np.mean([u for u, _ in stores], axis=0))
    # The order of stores does not matter.
    order = list(range(len(stores)))
    random.shuffle(order)
    assert np.allclose(aggregate("fedavg", [updates[i] for i in order], [weights[i] for i in order])["w"], out)
    # Identical updates aggregate to themselves.
    assert np.allclose(aggregate("fedavg", [updates[0]] * 3, weights[:1] * 3)["w"], updates[0]["w"])


OUTLIER = [{"w": [1.0, 2.0]}, {"w": [2.0, 3.0]}, {"w": [3.0, 1.0]}, {"w": [2.5, 2.5]}, {"w": [100.0, -100.0]}]


def test_fedmedian_ignores_the_outlier():
    out = aggregate("fedmedian", OUTLIER, [1] * 5)
    assert out["w"].tolist() == np.median([u["w"] for u in OUTLIER], axis=0).tolist() == [2.5, 2.0]


def test_fedtrimmedavg_cuts_each_end():
    out = aggregate("fedtrimmedavg", OUTLIER, [1] * 5, beta=0.2)
    values = np.sort(np.array([u["w"] for u in OUTLIER]), axis=0)[1:-1]  # one of five cut at each end
    assert np.allclose(out["w"], values.mean(axis=0))


def test_krum_picks_the_update_closest_to_its_neighbours():
    out = aggregate("krum", OUTLIER, [1] * 5, num_malicious_nodes=1)
    x = np.array([u["w"] for u in OUTLIER])
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = len(x) - 1 - 2  # n - f - 2 closest neighbours
    scores = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(len(x))]
    assert out["w"].tolist() == x[int(np.argmin(scores))].tolist()


def test_fedadam_one_step_is_the_textbook_update():
    eta, beta_1, beta_2, tau = 0.1, 0.9, 0.99, 1e-9
    x = np.array([1.0, -2.0, 0.5])
    updates = [{"w": [2.0, -1.0, 0.5]}, {"w": [0.0, -1.0, 1.5]}]
    out = aggregate("fedadam", updates, [1, 1], global_arrays={"w": x}, eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    delta = np.mean([u["w"] for u in updates], axis=0) - x  # pseudo-gradient
    m = (1 - beta_1) * delta
    v = (1 - beta_2) * delta ** 2
    # Flower's bias correction uses t = server_round + 1 = 2.
    eta_t = eta * np.sqrt(1 - beta_2 ** 2) / (1 - beta_1 ** 2)
    assert np.allclose(out["w"], x + eta_t * m / (np.sqrt(v) + tau))


def test_update_checks_reject_each_bad_kind():
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    good = [{"a": np.full((2, 3), 0.1 * i, np.float32), "b": np.full(4, 0.1, np.float32)} for i in range(1, 5)]
    bad = [
        {"a": np.zeros((2, 3), np.float32)},  # a parameter missing
        {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32), "c": np.zeros(1, np.float32)},
        {"a": np.zeros((3, 2), np.float32), "b": np.zeros(4, np.float32)},  # wrong shape
        {"a": np.zeros((2, 3), np.float64), "b": np.zeros(4, np.float32)},  # wrong dtype
        {"a": np.full((2, 3), np.nan, np.float32), "b": np.zeros(4, np.float32)},
        {"a": np.full((2, 3), np.inf, np.float32), "b": np.zeros(4, np.float32)},
        {"a": np.full((2, 3), 1e4, np.float32), "b": np.zeros(4, np.float32)},  # far above the median
    ]
    reasons = check_updates(ref, good + bad, norm_factor=10.0)
    assert reasons[:4] == [None] * 4
    assert "names differ" in reasons[4] and "names differ" in reasons[5]
    assert "shape (3, 2)" in reasons[6] and "dtype float64" in reasons[7]
    assert "NaN or Inf" in reasons[8] and "NaN or Inf" in reasons[9]
    assert "median" in reasons[10]
    assert check_updates(ref, good + bad[-1:], norm_factor=0.0)[-1] is None  # the distance check off
