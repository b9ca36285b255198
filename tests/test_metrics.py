"""Ranking metrics and baselines against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.evaluation.metrics import mean_metrics, per_member_metrics, top_k, topfreq_scores

LOG2 = math.log2


def test_metrics_on_a_hand_computed_list():
    # 20 items ranked 0..19; targets {2, 5, 30}: hits at ranks 3 and 6 (1-based); 30 never ranked.
    ranked = np.arange(20)[None, :]
    m = per_member_metrics(ranked, [np.array([2, 5, 30])])
    dcg = 1 / LOG2(4) + 1 / LOG2(7)
    idcg = 1 / LOG2(2) + 1 / LOG2(3) + 1 / LOG2(4)
    assert m["ndcg@10"][0] == pytest.approx(dcg / idcg)
    assert m["recall@10"][0] == pytest.approx(2 / 3)
    assert m["hit@10"][0] == 1.0
    # AP@10 = (1/min(3,10)) * (P@3 + P@6) = (1/3)(1/3 + 2/6)
    assert m["map@10"][0] == pytest.approx((1 / 3) * (1 / 3 + 2 / 6))
    assert m["ndcg@20"][0] == pytest.approx(dcg / idcg)


def test_a_miss_and_a_perfect_list():
    ranked = np.array([np.arange(20), np.arange(20)])
    m = mean_metrics(ranked, [np.array([50]), np.array([0, 1])])
    # member 1 misses (all zero), member 2 is perfect (all one)
    assert m["ndcg@10"] == pytest.approx(0.5)
    assert m["recall@20"] == pytest.approx(0.5)
    assert m["hit@10"] == pytest.approx(0.5)
    assert m["map@10"] == pytest.approx(0.5)


def test_hit_only_at_rank_15_counts_at_20_not_10():
    ranked = np.arange(20)[None, :]
    m = per_member_metrics(ranked, [np.array([14])])
    assert m["hit@10"][0] == 0.0 and m["hit@20"][0] == 1.0
    assert m["ndcg@20"][0] == pytest.approx(1 / LOG2(16))
    assert m["map@20"][0] == pytest.approx(1 / 15)


def test_top_k_respects_the_mask_and_breaks_ties_by_index():
    scores = np.array([[1.0, 5.0, 5.0, 3.0, 9.0]])
    allowed = np.array([True, True, True, True, False])
    assert top_k(scores, 3, allowed).tolist() == [[1, 2, 3]]


def test_topfreq_ranks_own_items_by_count_then_recency_then_popularity():
    popularity = np.array([10.0, 50.0, 0.0, 30.0, 20.0])
    scores = topfreq_scores(
        [np.array([2, 4, 0])], [np.array([3.0, 1.0, 1.0])], [np.array([5.0, 9.0, 7.0])], popularity
    )
    # item 2 bought 3 times; items 4 and 0 once each, 4 more recently; then 1 and 3 by popularity.
    assert top_k(scores, 5).tolist() == [[2, 4, 0, 1, 3]]


def test_empty_target_is_an_error():
    with pytest.raises(ValueError):
        per_member_metrics(np.arange(20)[None, :], [np.array([], dtype=int)])
