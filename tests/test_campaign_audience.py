"""Campaign audiences: the set score, the store's features and calibration
(common/learning/audience_score.py) and the bench's cut discipline (simulations/bench/campaigns.py),
on tiny hand-made tables."""

from datetime import date

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from common.evaluation import campaigns as cp
from common.learning import audience_score as aud
from simulations.bench import campaigns as cb


def test_set_log_share_is_the_log_of_the_summed_probabilities():
    logp = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    got = aud.set_log_share(logp, np.array([0, 1]))
    assert got == pytest.approx(np.log([0.8, 0.2]))
    assert np.all(np.isneginf(aud.set_log_share(logp, np.array([], np.int64))))


def _lines():
    # member, day, basket, item, coupon
    rows = [("a", 10, 1, 7, False), ("a", 12, 2, 7, True), ("a", 40, 3, 8, True),
            ("b", 30, 4, 9, False), ("b", 35, 5, 7, False), ("c", 5, 6, 9, False)]
    return pd.DataFrame(rows, columns=["member", "day", "basket", "item", "coupon"])


def test_history_features_by_hand():
    x = aud.history_features(_lines(), np.array(["a", "b", "c", "d"]), {7}, before_day=36.0)
    # baskets in the 56 days before day 36, coupon lines, lines of the set, coupon lines of the set
    expected = np.log1p(np.array([[2, 1, 2, 1], [2, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], float))
    assert x == pytest.approx(expected)


def test_history_features_ignore_lines_from_the_day_on():
    lines = _lines()
    later = pd.DataFrame([("c", 36, 9, 7, True), ("a", 50, 10, 7, True)], columns=lines.columns)
    members = np.array(["a", "b", "c"])
    assert aud.history_features(pd.concat([lines, later]), members, {7}, 36.0) == pytest.approx(
        aud.history_features(lines, members, {7}, 36.0))


def test_fit_logistic_matches_a_generic_optimizer():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)) * [1.0, 3.0, 0.5] + [0.0, 2.0, -1.0]
    y = (x @ [1.0, -0.4, 2.0] + rng.normal(size=200) > 0.2)
    cal = aud.fit_logistic(x, y, l2=1.0)
    # the same objective (standardized inputs, one pseudo-positive and -negative at the mean, L2 on the weights)
    z = np.vstack([(x - x.mean(0)) / x.std(0), np.zeros((2, 3))])
    t = np.r_[y.astype(float), 1.0, 0.0]

    def loss(w):
        s = z @ w[:3] + w[3]
        return np.sum(np.logaddexp(0, s) - t * s) + 0.5 * np.sum(w[:3] ** 2)

    ref = minimize(loss, np.zeros(4), method="BFGS", options={"gtol": 1e-9}).x
    assert cal.weights == pytest.approx(ref[:3], abs=1e-4)
    assert cal.bias == pytest.approx(ref[3], abs=1e-4)
    p = cal.probability(x)
    assert p.min() > 0 and p.max() < 1


def test_fit_logistic_without_positives_stays_finite():
    cal = aud.fit_logistic(np.arange(10.0)[:, None], np.zeros(10, bool))
    p = cal.probability(np.arange(10.0)[:, None])
    assert np.all(np.isfinite(p)) and p.max() < 0.2


def test_group_cuts():
    c = [cp.Campaign(i, "B", d, d) for i, d in enumerate([date(2017, 5, 8), date(2017, 7, 1), date(2017, 9, 10),
                                                          date(2017, 9, 20)])]
    groups = cb.group_cuts(c, gap_days=60)
    assert [(g[0], [x.campaign_id for x in g[1]]) for g in groups] == [
        (date(2017, 5, 8), [0, 1]), (date(2017, 9, 10), [2, 3])]
    assert all(g[0] <= x.start for g in groups for x in g[1])


def _tables(extra: list[tuple] = ()) -> cb.Tables:
    start = cb.day_of("2017-03-01")
    rows = [(1, 1, 1, 100, 5.0, False, start - 30), (1, 1, 2, 101, 2.0, True, start - 3),
            (2, 1, 3, 102, 4.0, False, start - 10), (3, 2, 4, 100, 1.0, False, start - 70),
            (2, 1, 5, 100, 3.0, False, start + 2), (3, 2, 6, 101, 3.0, True, start + 5), *extra]
    tx = pd.DataFrame(rows, columns=["household", "store", "basket", "product", "sales", "coupon", "day"])
    category = pd.Series(["x", "x", "y"], index=[100, 101, 102])
    camp = cp.Campaign(9, "B", date(2017, 3, 1), date(2017, 3, 10))
    red = pd.DataFrame({"household": [1, 3], "campaign": [5, 9], "day": [start - 3, start + 5]})
    return cb.Tables(tx, category, [camp], {9: np.array([1, 3])}, {9: np.array([100, 101])}, red)


def test_tasks_labels_by_hand():
    t = _tables()
    got = cb.tasks(t, t.campaigns[0])
    rec, red = got["rec_red"]
    assert list(rec) == [1, 3] and list(red) == [False, True]
    assert list(got["rec_buy"][1]) == [False, True]
    everyone, buy = got["all_buy"]
    # active in the 56 days before: households 1 and 2; plus recipient 3
    assert list(everyone) == [1, 2, 3] and list(buy) == [False, True, True]


def test_baseline_features_by_hand_and_blind_to_later_lines():
    t = _tables()
    c = t.campaigns[0]
    start = cb.day_of(c.start)
    f = cb.baseline_features(t.before(start), c, np.array([1, 2, 3]))
    assert list(f["recency"]) == [3, 10, 70]
    assert list(f["frequency"]) == [2, 1, 1]
    assert list(f["coupon_lines"]) == [2, 0, 1]
    assert list(f["coupon_use"]) == [1, 0, 0]
    # spend share in category x (products 100, 101) × spend in the 56 days before: 1 → 1 × 7, 2 → 0, 3 → 1 × 0
    assert list(f["category_share"]) == [7.0, 0.0, 0.0]
    later = _tables([(3, 2, 7, 100, 50.0, True, start), (2, 1, 8, 101, 9.0, True, start + 1)])
    g = cb.baseline_features(later.before(start), c, np.array([1, 2, 3]))
    for k in f:
        assert list(f[k]) == list(g[k])


def test_combined_score_and_relative_model_score_by_hand():
    h = np.log1p(np.array([[3, 2, 1, 1], [0, 0, 0, 0]], float))  # baskets 8w, coupon lines, set lines, set coupon lines
    rel = aud.relative_model_score(np.array([-1.0, -3.0, -np.inf]))
    assert list(rel) == [1.0, -1.0, 0.0]  # minus the median of the finite ones; none → 0
    buy = aud.combined_score(np.array([1.0, -1.0]), h, "buy")
    assert buy == pytest.approx([np.log(2) + 0.5 * (np.log(4) + 1.0), 0.5 * -1.0])
    red = aud.combined_score(np.array([1.0, -1.0]), h, "redeem")
    assert red == pytest.approx(buy + [np.log(3) + np.log(2), 0.0])


def _chain_lines(extra=()):
    # household, store, basket, product, sales, coupon, day
    rows = [(1, 10, 1, 100, 1.0, False, 5.0), (1, 10, 2, 100, 1.0, True, 80.0), (1, 20, 3, 101, 1.0, False, 85.0),
            (2, 20, 4, 100, 1.0, False, 30.0), (2, 20, 5, 102, 1.0, False, 90.0), (2, 10, 6, 100, 1.0, False, 91.0),
            (3, 10, 7, 102, 1.0, True, 95.0), (3, 10, 8, 102, 1.0, False, 96.0), *extra]
    return pd.DataFrame(rows, columns=["household", "store", "basket", "product", "sales", "coupon", "day"])


def test_home_stores_and_store_features_by_hand():
    tx = _chain_lines()
    assert cb.home_stores(tx, 100.0).to_dict() == {1: 10, 2: 20, 3: 10}  # 1: 2 baskets at 10; 2: 2 at 20
    f = cb.store_member_features(tx, np.array([100]), 100.0)
    # household 1 at store 10: 2 baskets in the last 56 days? only day 80 (day 5 is older) → 1; 1 coupon line;
    # 2 lines of product 100; 1 of them with a coupon
    assert f.loc[(10, 1)].to_numpy() == pytest.approx(np.log1p([1, 1, 2, 1]))
    assert f.loc[(20, 2)].to_numpy() == pytest.approx(np.log1p([1, 0, 1, 0]))
    assert (20, 3) not in f.index


def test_store_probabilities_are_blind_to_lines_from_the_start_on():
    start = 100.0
    hh = np.array([1, 2, 3, 4])
    p, covered = cb.store_probabilities(_chain_lines(), np.array([100]), start, "buy", None, hh)
    later = _chain_lines([(4, 10, 9, 100, 1.0, True, 100.0), (2, 10, 10, 100, 1.0, True, 120.0)])
    q, covered_later = cb.store_probabilities(later, np.array([100]), start, "buy", None, hh)
    assert p == pytest.approx(q) and covered == covered_later == 0.75
    assert p[3] == -1.0 and np.all((p[:3] > 0) & (p[:3] < 1))  # household 4 has no line before the start


def test_calibration_matches_the_base_rate_on_its_own_members():
    # With an unpenalised intercept, a logistic fit's probabilities sum to the labels' count on the
    # rows it was fitted on (here plus the two pseudo-rows at the mean, which add 1 label).
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 2))
    y = rng.random(300) < 1 / (1 + np.exp(-(x[:, 0] - 1.5)))
    cal = aud.fit_logistic(x, y)
    at_mean = cal.probability(x.mean(0, keepdims=True))[0]
    assert cal.probability(x).sum() + 2 * at_mean == pytest.approx(y.sum() + 1, abs=1e-6)
