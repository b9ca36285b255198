"""server.update_checks against hand-computed distances, limits and exact reasons
(written to kill the mutants that tests/test_aggregation.py leaves alive)."""

from __future__ import annotations

import math

import numpy as np

from server.update_checks import check_updates, distance, shape_problem


def _ref():
    return {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}


def test_shape_problem_names_what_is_missing_and_extra_sorted_and_at_most_three():
    ref = {k: np.zeros(1, np.float32) for k in ("p", "q", "r", "s", "t")}
    update = {k: np.zeros(1, np.float32) for k in ("z", "y", "x", "w", "t")}
    assert shape_problem(ref, update) == (
        "parameter names differ (missing ['p', 'q', 'r'], unexpected ['w', 'x', 'y'])")
    assert shape_problem(ref, {**ref, "extra": np.zeros(1)}) == (
        "parameter names differ (missing [], unexpected ['extra'])")


def test_shape_problem_exact_reasons_and_none_for_a_fitting_update():
    ref = _ref()
    assert shape_problem(ref, {k: v.copy() for k, v in ref.items()}) is None
    assert shape_problem(ref, {"a": np.zeros((2, 2), np.float32), "b": np.zeros(4, np.float32)}) == (
        "parameter 'b' has shape (4,), expected (3,)")
    assert shape_problem(ref, {"a": np.zeros((2, 2), np.float64), "b": np.zeros(3, np.float32)}) == (
        "parameter 'a' has dtype float64, expected float32")


def test_distance_is_the_l2_norm_over_every_parameter_in_float64():
    ref = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.5]], np.float32)}
    update = {"a": np.array([4.0, 6.0], np.float32), "b": np.array([[12.5]], np.float32)}
    # (3, 4) and 12: sqrt(9 + 16 + 144) = 13
    assert distance(ref, update) == 13.0
    # float32 squares would lose this: 1e20² overflows float32, not float64
    big = {"a": np.array([1e20, 0.0], np.float32), "b": np.array([[0.0]], np.float32)}
    zero = {"a": np.zeros(2, np.float32), "b": np.zeros((1, 1), np.float32)}
    assert math.isclose(distance(zero, big), 1e20, rel_tol=1e-6)
    # the reference is subtracted, not added
    assert distance(update, update) == 0.0


def test_the_limit_is_norm_factor_times_the_median_and_the_boundary_is_accepted():
    ref = {"w": np.zeros(1, np.float32)}
    ups = [{"w": np.array([d], np.float32)} for d in (1.0, 2.0, 3.0, 30.0, 30.5)]
    # median of (1, 2, 3, 30, 30.5) = 3, limit 10 × 3 = 30: 30 is accepted, 30.5 is not
    reasons = check_updates(ref, ups, norm_factor=10.0)
    assert reasons[:4] == [None, None, None, None]
    assert reasons[4] == "update moves the model by 30.5, over 10 × the round's median 3"
    # the median, not the mean (7.3) or the max: with factor 2 the limit is 6
    reasons = check_updates(ref, ups, norm_factor=2.0)
    assert reasons == [None, None, None, "update moves the model by 30, over 2 × the round's median 3",
                       "update moves the model by 30.5, over 2 × the round's median 3"]


def test_rejected_updates_do_not_enter_the_median():
    ref = {"w": np.zeros(1, np.float32)}
    ups = [{"w": np.array([1.0], np.float32)}, {"w": np.array([1.0], np.float32)},
           {"w": np.array([np.nan], np.float32)}, {"w": np.array([np.inf], np.float32)},
           {"w": np.array([2.5], np.float32)}, {"x": np.array([100.0], np.float32)}]
    reasons = check_updates(ref, ups, norm_factor=2.0)
    # median of the three well-formed distances (1, 1, 2.5) is 1: 2.5 > 2 × 1 is rejected
    assert reasons[0] is None and reasons[1] is None
    assert reasons[2] == reasons[3] == "update holds NaN or Inf values"
    assert reasons[4] == "update moves the model by 2.5, over 2 × the round's median 1"
    assert reasons[5].startswith("parameter names differ")


def test_the_distance_check_needs_two_good_updates_and_a_positive_factor():
    ref = {"w": np.zeros(1, np.float32)}
    one = [{"w": np.array([1e6], np.float32)}, {"w": np.array([np.nan], np.float32)}]
    assert check_updates(ref, one, norm_factor=10.0) == [None, "update holds NaN or Inf values"]
    two = [{"w": np.array([1.0], np.float32)}, {"w": np.array([100.0], np.float32)}]
    # median of (1, 100) is 50.5; factor 1: 100 > 50.5 is rejected, 1 is not
    assert check_updates(ref, two, norm_factor=1.0) == [
        None, "update moves the model by 100, over 1 × the round's median 50.5"]
    assert check_updates(ref, two, norm_factor=0.0) == [None, None]
    assert check_updates(ref, two, norm_factor=-1.0) == [None, None]
    # the default factor is 10: 100 is under 10 × 50.5
    assert check_updates(ref, two) == [None, None]
    three = two + [{"w": np.array([1.0], np.float32)}]
    # median 1, default limit 10
    assert check_updates(ref, three)[1] == "update moves the model by 100, over 10 × the round's median 1"


def test_a_non_finite_value_in_any_parameter_is_caught():
    ref = _ref()
    ups = [{"a": np.zeros((2, 2), np.float32), "b": np.array([0, 0, -np.inf], np.float32)},
           {"a": np.array([[0, np.nan], [0, 0]], np.float32), "b": np.zeros(3, np.float32)},
           {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}]
    assert check_updates(ref, ups, norm_factor=10.0) == ["update holds NaN or Inf values"] * 2 + [None]
