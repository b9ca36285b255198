"""Aggregation through Flower's strategies, checked against numbers computed by hand or numpy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from server.update_checks import check_updates
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


def _strategy(name: str, reference: dict, **options):
    """A strategy with its server-side state set as after configure_train sent ``reference``."""
    options.setdefault("norm_factor", 0.0)
    strategy = make_strategy(name, num_rounds=2, printer=lambda _: None, **options)
    strategy._sent = {k: np.asarray(v, dtype=np.float64) for k, v in reference.items()}
    if name in ("fedadam", "fedyogi"):
        strategy.current_arrays = {k: np.asarray(v, dtype=np.float64) for k, v in reference.items()}
    elif hasattr(strategy, "current_arrays"):
        strategy.current_arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in reference.items()})
    return strategy


def _round(strategy, server_round: int, updates: list[dict], weights: list[int]):
    arrays, _ = strategy.aggregate_train(server_round, [reply(u, w, f"S{i}") for i, (u, w) in enumerate(zip(updates, weights))])
    return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}


def test_fedavgm_two_rounds_follow_the_hand_computed_momentum():
    x0 = np.array([1.0, -1.0])
    s = _strategy("fedavgm", {"w": x0}, server_momentum=0.5, server_learning_rate=2.0)
    # Round 1: mean of [3, -1]·1 and [0, 2]·3 = [3/4, 5/4]; pseudo-gradient x0 − mean = [1/4, −9/4];
    # momentum = that; x1 = x0 − 2·[1/4, −9/4] = [1/2, 7/2].
    x1 = _round(s, 1, [{"w": [3.0, -1.0]}, {"w": [0.0, 2.0]}], [1, 3])["w"]
    assert x1.tolist() == [0.5, 3.5]
    # Round 2: mean [1, 4] (equal weights of [2, 4] and [0, 4]); pseudo-gradient x1 − mean
    # = [−1/2, −1/2]; momentum 0.5·[1/4, −9/4] + [−1/2, −1/2] = [−3/8, −13/8];
    # x2 = x1 − 2·momentum = [5/4, 27/4].
    s._sent = {"w": x1}
    x2 = _round(s, 2, [{"w": [2.0, 4.0]}, {"w": [0.0, 4.0]}], [5, 5])["w"]
    assert np.allclose(x2, [1.25, 6.75], rtol=0, atol=1e-12)


def test_fedyogi_two_steps_are_the_hand_computed_update():
    eta, beta_1, beta_2, tau = 0.1, 0.9, 0.99, 1e-3
    x0 = np.array([1.0, -2.0])
    s = _strategy("fedyogi", {"w": x0}, eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
    # Step 1: Δ = mean − x0 = [1, 0.5]; m = 0.1·Δ = [0.1, 0.05]; v = 0 − 0.01·Δ²·sign(0 − Δ²) = 0.01·Δ²
    # = [0.01, 0.0025]; x1 = x0 + 0.1·m / (√v + τ) = x0 + [0.01/0.101, 0.005/0.051].
    x1 = _round(s, 1, [{"w": [2.0, -1.0]}, {"w": [2.0, -2.0]}], [1, 1])["w"]
    expected1 = np.array([1.0 + 0.01 / 0.101, -2.0 + 0.005 / 0.051])
    assert np.allclose(x1, expected1, rtol=1e-12, atol=0)
    # Step 2, aggregate [3, −3]: Δ = [3, −3] − x1; m = 0.9·m + 0.1·Δ; Yogi's v moves towards Δ²
    # by at most 0.01·Δ² in the direction of sign(Δ² − v): here v < Δ², so v += 0.01·Δ².
    # (FedOpt takes the arrays it sends as its current ones in configure_train.)
    s.current_arrays, s._sent = {"w": x1}, {"w": x1}
    x2 = _round(s, 2, [{"w": [3.0, -3.0]}], [1])["w"]
    d = np.array([3.0, -3.0]) - expected1
    m = 0.9 * np.array([0.1, 0.05]) + 0.1 * d
    v = np.array([0.01, 0.0025]) + 0.01 * d ** 2
    assert np.allclose(x2, expected1 + eta * m / (np.sqrt(v) + tau), rtol=1e-12, atol=0)


def test_multikrum_averages_the_hand_picked_lowest_scores():
    # Squared distances between the five OUTLIER points: a–b 2, a–c 5, a–d 2.5, b–c 5, b–d 0.5,
    # c–d 2.5, anything–e ≥ 9800. n − f − 2 = 2 closest: scores a 4.5, b 2.5, c 7.5, d 3, e huge.
    # Three lowest: b, d, a, averaged with their weights 2, 4, 1.
    out = aggregate("multikrum", OUTLIER, [1, 2, 3, 4, 5], num_malicious_nodes=1, num_nodes_to_select=3)
    assert np.allclose(out["w"], [15 / 7, 18 / 7], rtol=1e-12, atol=0)
    # No count given: n − f = 4 each round, so a, b, c, d with weights 1, 2, 3, 4:
    # ([1,2] + 2·[2,3] + 3·[3,1] + 4·[2.5,2.5]) / 10. (Flower's own default, 1, would be Krum: b alone.)
    out = aggregate("multikrum", OUTLIER, [1, 2, 3, 4, 5], num_malicious_nodes=1)["w"]
    assert np.allclose(out, [2.4, 2.1], rtol=1e-12, atol=0)
    assert aggregate("krum", OUTLIER, [1, 2, 3, 4, 5], num_malicious_nodes=1)["w"].tolist() == [2.0, 3.0]


def test_the_configured_multikrum_averages_more_than_one_update():
    from common.config import RunConfig
    from server.server_app import strategy_options

    options = strategy_options(RunConfig.from_mapping({"strategy": "multikrum", "krum-malicious": 1}))
    multi = aggregate("multikrum", OUTLIER, [1] * 5, **options)["w"]
    krum = aggregate("krum", OUTLIER, [1] * 5, num_malicious_nodes=1)["w"]
    assert multi.tolist() != krum.tolist()
    # n − f = 4 of the 5 updates: every one but the outlier, averaged: ([1,2]+[2,3]+[3,1]+[2.5,2.5]) / 4.
    assert np.allclose(multi, [2.125, 2.125], rtol=1e-12, atol=0)


def test_fedprox_sends_mu_to_the_stores_and_averages_like_fedavg():
    class TwoNodeGrid:  # what configure_train asks of Flower's Grid
        def get_node_ids(self):
            return [5, 6]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    s = _strategy("fedprox", {"w": np.zeros(2)}, proximal_mu=0.25)
    sent = list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(2))}), ConfigRecord({}), TwoNodeGrid()))
    assert len(sent) == 2 and all(m.content["config"]["proximal-mu"] == 0.25 for m in sent)
    out = _round(s, 1, [{"w": [1.0, 2.0]}, {"w": [4.0, 5.0]}], [1, 2])
    assert np.allclose(out["w"], [3.0, 4.0], rtol=1e-15, atol=0)  # (1·[1, 2] + 2·[4, 5]) / 3


# --- the update checks inside a real round (norm_factor as configured, not switched off) -------

def test_a_rejected_update_is_left_out_of_the_aggregate():
    s = _strategy("fedavg", {"w": np.zeros(2)}, norm_factor=10.0)
    # Distances to the global model 1, 1, 2 and 50: the median is 1.5, the limit 15.
    updates = [{"w": [1.0, 0.0]}, {"w": [0.0, 1.0]}, {"w": [2.0, 0.0]}, {"w": [0.0, 50.0]}]
    out = _round(s, 1, updates, [1, 1, 2, 100])
    assert out["w"].tolist() == [(1 + 4) / 4, 1 / 4]  # the heavy outlier carries no weight
    entry = s.rounds[-1]
    assert entry["participated"] == 4 and entry["rejected"] == 1
    assert [f["phase"] for f in s.failures] == ["validation"] and "over 10 × the round's median 1.5" in s.failures[0]["reason"]


@pytest.mark.parametrize("far,rejected", [(10.0 * (1 - 1e-9), False), (10.0, False), (10.0 * (1 + 1e-9), True)])
def test_the_norm_check_boundary_is_ten_times_the_median(far, rejected):
    # Distances 1, 1 and `far`: the median is 1 whatever `far` is, so the limit is exactly 10.
    ref = {"w": np.zeros(2)}
    updates = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])}, {"w": np.array([far, 0.0])}]
    reasons = check_updates(ref, updates, norm_factor=10.0)
    assert reasons[:2] == [None, None] and (reasons[2] is not None) == rejected
    s = _strategy("fedavg", ref, norm_factor=10.0)
    out = _round(s, 1, [{k: v.tolist() for k, v in u.items()} for u in updates], [1, 1, 1])
    kept = updates[:2] if rejected else updates
    assert np.allclose(out["w"], np.mean([u["w"] for u in kept], axis=0), rtol=1e-12, atol=0)
    assert s.rounds[-1]["rejected"] == int(rejected)


def test_a_round_with_fewer_acceptable_updates_than_min_stores_is_skipped():
    said = []
    s = _strategy("fedavg", {"w": np.zeros(2)}, norm_factor=10.0, min_stores=3)
    s.printer = said.append
    previous = ArrayRecord({"w": Array(np.array([7.0, 7.0]))})
    s.latest_arrays = previous
    nan = {"w": [float("nan"), 0.0]}
    arrays, metrics = s.aggregate_train(1, [reply({"w": [1.0, 0.0]}, 1, "S0"), reply({"w": [0.0, 1.0]}, 1, "S1"),
                                            reply(nan, 1, "S2")])
    assert arrays is None and metrics is None
    assert s.rounds[-1]["skipped"] is True and s.rounds[-1]["rejected"] == 1
    assert s.latest_arrays is previous  # the global model stays as it was
    assert any("round 1 skipped: 2 acceptable updates, 3 needed" in line for line in said)
    # With exactly min_stores acceptable updates the round aggregates.
    s2 = _strategy("fedavg", {"w": np.zeros(2)}, norm_factor=10.0, min_stores=2)
    arrays, _ = s2.aggregate_train(1, [reply({"w": [1.0, 0.0]}, 1, "S0"), reply({"w": [0.0, 1.0]}, 1, "S1"),
                                       reply(nan, 1, "S2")])
    assert arrays["w"].numpy().tolist() == [0.5, 0.5]
