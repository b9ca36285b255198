"""The campaign protocol's pure parts (common/evaluation/campaigns.py), on hand-computed numbers."""

from datetime import date

import numpy as np
import pytest

from common.evaluation import campaigns as cp


def test_window_share_counts_days_inside_the_data():
    c = cp.Campaign(22, "B", date(2017, 12, 6), date(2018, 1, 7))  # 33 days, 27 of them up to Jan 1
    assert c.days == 33
    assert cp.window_share(c, date(2018, 1, 1)) == pytest.approx(27 / 33)
    assert cp.window_share(c, date(2017, 12, 5)) == 0.0


@pytest.mark.parametrize("start,end,recipients,redeemers,ok", [
    (date(2017, 3, 3), date(2017, 4, 9), 50, 10, True),     # 61 days of history, everything at the minimum
    (date(2017, 2, 8), date(2017, 3, 26), 500, 99, False),  # 38 days of history only
    (date(2017, 3, 3), date(2017, 4, 9), 49, 10, False),    # one recipient short
    (date(2017, 3, 3), date(2017, 4, 9), 50, 9, False),     # one redeemer short
    (date(2017, 12, 28), date(2018, 2, 4), 500, 99, False),  # 5 of 39 days inside the data
])
def test_qualifying_rule(start, end, recipients, redeemers, ok):
    c = cp.Campaign(1, "B", start, end)
    assert cp.qualifies(c, date(2017, 1, 1), date(2018, 1, 1), recipients, redeemers) is ok


def test_lift_of_a_clean_top_decile():
    scores = np.array([4, 3, 2, 1, 0, 0, 0, 0, 0, 0], float)
    positive = np.zeros(10, bool)
    positive[[0, 9]] = True
    # top = 1 candidate, a positive: rate 1 over the base rate 0.2
    assert cp.top_share_lift(scores, positive) == pytest.approx(5.0)


def test_lift_shares_the_boundary_among_ties_whatever_the_order():
    scores = np.array([5, 3, 3, 3] + [0] * 16, float)
    positive = np.zeros(20, bool)
    positive[[0, 2]] = True
    # top 2: the 5 (positive) and one third of each of the three 3s (one positive): 1 + 1/3 found
    expected = ((1 + 1 / 3) / 2) / 0.1
    assert cp.top_share_lift(scores, positive) == pytest.approx(expected)
    order = np.random.default_rng(0).permutation(20)
    assert cp.top_share_lift(scores[order], positive[order]) == pytest.approx(expected)


def test_lift_without_positives_is_nan():
    assert np.isnan(cp.top_share_lift(np.arange(5.0), np.zeros(5, bool)))


def test_task_metrics_auc_averages_ties():
    m = cp.task_metrics(np.array([1.0, 1.0, 0.0]), np.array([True, False, False]))
    # the positive ties one negative (½) and beats the other (1): (½ + 1) / 2
    assert m["auc"] == pytest.approx(0.75)
    assert (m["candidates"], m["positives"]) == (3, 1)


def test_mean_metrics_leaves_out_nan_rows():
    rows = [{"auc": 0.6, "lift10": 2.0}, {"auc": 0.8, "lift10": 4.0}, {"auc": float("nan"), "lift10": float("nan")}]
    m = cp.mean_metrics(rows)
    assert m["auc"] == pytest.approx(0.7) and m["lift10"] == pytest.approx(3.0) and m["campaigns"] == 2


def test_purchase_rate_change():
    before = np.array([1, 0, 0, 0, 1, 1, 0, 0], bool)
    during = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    rec = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    d = cp.purchase_rate_change(before, during, rec)
    # recipients 3/4 − 1/4 = 0.5; others 1/4 − 2/4 = −0.25
    assert d["recipients"] == pytest.approx(0.5) and d["others"] == pytest.approx(-0.25)
    assert d["difference"] == pytest.approx(0.75)
