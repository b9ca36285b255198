"""Goods find people: member rankings for an item, against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from common.evaluation.audience import audience_metrics, recall_at_k, roc_auc


def test_auc_by_hand_with_a_tie():
    # Buyers score 0.9 and 0.4; non-buyers 0.8, 0.4 and 0.1. Of the 2×3 buyer/non-buyer pairs
    # the buyer wins (0.9>0.8), (0.9>0.4), (0.9>0.1), (0.4>0.1), ties once (0.4=0.4), loses once.
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.1])
    buyers = np.array([True, False, True, False, False])
    assert roc_auc(scores, buyers) == pytest.approx((4 + 0.5) / 6)


def test_auc_extremes_and_undefined():
    assert roc_auc(np.array([3.0, 2.0, 1.0]), np.array([True, True, False])) == 1.0
    assert roc_auc(np.array([1.0, 2.0, 3.0]), np.array([True, True, False])) == 0.0
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([True, True])))


def test_recall_at_k():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    buyers = np.array([False, True, False, False, True])
    assert recall_at_k(scores, buyers, k=2) == 0.5 and recall_at_k(scores, buyers, k=5) == 1.0


def test_audience_metrics_average_items_and_skip_undefined_ones():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.1, 0.3, 0.5]])  # members × catalog
    bought = np.array([[True, False, True], [False, True, True], [False, False, True]])  # item 2: all bought
    result = audience_metrics(scores, bought, np.array([0, 1, 2]), k=1)
    # item 0: buyer m0 ranks first (AUC 1, recall@1 1); item 1: buyer m1 ranks first; item 2 undefined.
    assert result == {"auc": 1.0, "recall@1": 1.0, "items": 2}
