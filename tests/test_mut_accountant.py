"""common.privacy.accountant against Opacus' accountants called directly (not through our
wrapper) and against hand-worked values: kills the mutants tests/test_privacy.py leaves alive."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy import accountant as acc

DELTA = 1e-6


def _opacus(kind: str, history, delta=DELTA) -> float:
    """ε straight from Opacus, on the history as given (no merging, no filtering)."""
    if kind == "prv":
        a = PRVAccountant()
        a.history = list(history)
        return float(a.get_epsilon(delta=delta, eps_error=0.01))
    a = RDPAccountant()
    a.history = list(history)
    return float(a.get_epsilon(delta=delta))


def test_store_delta_by_hand():
    assert acc.store_delta(0) == 1e-6 and acc.store_delta(-4) == 1e-6
    assert acc.store_delta(0, default=0.25) == 0.25
    assert acc.store_delta(100_000) == 1e-6  # 1 / (10 × 100 000) = 1e-6: equal to the default
    assert acc.store_delta(200_000) == 5e-7
    assert acc.store_delta(1) == 1e-6
    assert acc.store_delta(1, default=1.0) == 0.1
    assert acc.store_delta(4, default=1.0) == 0.025


def test_merge_history_sums_steps_per_setting_in_first_seen_order_and_drops_empty_entries():
    history = [(1, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.1, 2), (1.0, 0.2, 0), (3.0, 0.5, -2), (1.0, 0.2, 1)]
    merged = acc.merge_history(history)
    assert merged == [(1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.2, 1)]
    assert all(type(s) is float and type(q) is float and type(t) is int for s, q, t in merged)
    assert acc.merge_history([(1.0, 0.1, "4"), (1.0, 0.1, 1.0)]) == [(1.0, 0.1, 5)]
    assert acc.merge_history([]) == [] and acc.merge_history([(1.0, 0.1, 0)]) == []


def test_epsilon_of_nothing_trained_is_zero_and_of_no_noise_is_infinite():
    assert acc.epsilon([], DELTA) == 0.0
    assert acc.epsilon([(1.0, 0.1, 0), (0.0, 1.0, 0)], DELTA) == 0.0
    assert acc.epsilon([(0.0, 0.1, 1)], DELTA) == math.inf
    assert acc.epsilon([(1.0, 0.1, 5), (-1.0, 0.1, 1)], DELTA, "rdp") == math.inf
    # σ = 0 with no steps ran nothing: it is dropped, not infinite
    assert acc.epsilon([(1.0, 0.05, 10), (0.0, 0.05, 0)], DELTA, "rdp") == _opacus("rdp", [(1.0, 0.05, 10)])


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_epsilon_is_opacus_on_the_merged_history_at_the_given_delta(kind):
    history = [(1.2, 0.05, 20), (0.9, 0.02, 30), (1.2, 0.05, 10), (5.0, 0.1, 0)]
    merged = [(1.2, 0.05, 30), (0.9, 0.02, 30)]
    ours = acc.epsilon(history, DELTA, kind)
    assert ours == _opacus(kind, merged)
    # another δ gives Opacus' ε at that δ, and a larger one a smaller ε
    assert acc.epsilon(history, 1e-4, kind) == _opacus(kind, merged, 1e-4)
    assert acc.epsilon(history, 1e-4, kind) < ours
    # the accountant asked for is the one used (RDP is looser here)
    other = "rdp" if kind == "prv" else "prv"
    assert acc.epsilon(history, DELTA, other) != ours


def test_prv_is_the_default_accountant():
    history = [(1.0, 0.1, 10)]
    assert acc.epsilon(history, DELTA) == _opacus("prv", history)


def test_an_unknown_accountant_is_refused_by_name():
    with pytest.raises(ValueError) as err:
        acc._accountant("gdp", [(1.0, 0.1, 1)])
    assert str(err.value) == "unknown accountant 'gdp'; use one of prv, rdp"
    a = acc._accountant("rdp", [(1, 0.1, 2), (1, 0.1, 3)])
    assert isinstance(a, RDPAccountant) and a.history == [(1.0, 0.1, 5)]
    assert isinstance(acc._accountant("prv", []), PRVAccountant)


def _is_smallest(sigma, target, q, steps, kind="prv", prior=()):
    """σ meets the target and 0.5 % less noise does not (the bisection's tolerance)."""
    eps = lambda s: acc.epsilon([*prior, (s, q, steps)], DELTA, kind)  # noqa: E731
    return eps(sigma) <= target < eps(sigma * 0.995)


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_calibrated_sigma_is_the_smallest_that_meets_the_target(kind):
    sigma = acc.calibrate_noise(4.0, DELTA, 0.05, 100, kind)
    assert 0.3 < sigma < 100.0
    assert _is_smallest(sigma, 4.0, 0.05, 100, kind)


def test_a_target_that_needs_more_than_one_doubling_is_still_the_smallest():
    # ε = 0.5 over 50 full-batch steps needs σ well above 4 (the bracket doubles 1 → 2 → 4 → ...)
    sigma = acc.calibrate_noise(0.5, DELTA, 1.0, 50, "rdp")
    assert sigma > 4.0
    assert _is_smallest(sigma, 0.5, 1.0, 50, "rdp")


def test_calibration_counts_the_prior_history():
    prior = [(1.0, 0.05, 100)]
    spent = acc.epsilon(prior, DELTA, "rdp")
    sigma = acc.calibrate_noise(spent + 1.0, DELTA, 0.05, 50, "rdp", prior=prior)
    assert _is_smallest(sigma, spent + 1.0, 0.05, 50, "rdp", prior=prior)
    alone = acc.calibrate_noise(spent + 1.0, DELTA, 0.05, 50, "rdp")
    assert alone < sigma  # without the prior, less noise would do


def test_calibration_edges_have_their_exact_answers():
    assert acc.calibrate_noise(1.0, DELTA, 0.1, 0) == 0.0
    assert acc.calibrate_noise(1.0, DELTA, 0.1, -3) == 0.0
    assert acc.calibrate_noise(1e6, DELTA, 0.1, 10, "rdp") == acc.MIN_NOISE_MULTIPLIER
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError) as err:
            acc.calibrate_noise(bad, DELTA, 0.1, 10)
        assert str(err.value) == "target epsilon must be finite and > 0"
    prior = [(1.0, 0.1, 100)]
    spent = acc.epsilon(prior, DELTA)
    with pytest.raises(ValueError) as err:
        acc.calibrate_noise(spent, DELTA, 0.1, 10, prior=prior)  # spent == target: already spent
    assert str(err.value) == "the budget is already spent by earlier training"
    with pytest.raises(ValueError) as err:
        acc.calibrate_noise(1e-3, DELTA, 1.0, 1000, "rdp")
    assert str(err.value) == "no noise multiplier up to 100 reaches that epsilon"


def test_bisect_finds_the_smallest_sigma_within_half_a_percent():
    calls = []

    def eps_at(s):
        calls.append(s)
        return 10.0 / s

    # 10/σ ≤ 2 from σ = 5 on
    found = acc._bisect(eps_at, 2.0, 1.0, 16.0)
    assert 5.0 <= found <= 5.0 / 0.995
    assert 10.0 / found <= 2.0
    assert calls[0] == 1.0 and calls[1] == 8.5  # lo first, then the midpoint of [1, 16]
    # the low end itself meets the target: it is the answer, with no search
    calls.clear()
    assert acc._bisect(eps_at, 2.0, 6.0, 16.0) == 6.0 and calls == [6.0]
    # exactly at the target counts as meeting it
    assert acc._bisect(eps_at, 2.0, 5.0, 16.0) == 5.0


def test_a_midpoint_exactly_at_the_target_meets_it():
    # [1, 9]: the first midpoint is 5, where 10/σ is exactly the target 2; from there on only
    # larger midpoints are tried, so the answer is 5 itself.
    assert acc._bisect(lambda s: 10.0 / s, 2.0, 1.0, 9.0) == 5.0


def test_the_prv_refinement_is_bounded_like_the_rdp_bracket(monkeypatch):
    """A PRV estimate that never meets the target ends at the largest σ with an error, not in
    an endless loop (RDP meets it at σ = 1 here; PRV is made to stay above it)."""
    from common.privacy import accountant as acc

    real = acc.epsilon

    def epsilon(history, delta, kind="prv"):
        return real(history, delta, "rdp") if kind == "rdp" else 1e9

    monkeypatch.setattr(acc, "epsilon", epsilon)
    with pytest.raises(ValueError, match=f"no noise multiplier up to {acc.MAX_NOISE_MULTIPLIER:g}"):
        acc.calibrate_noise(8.0, 1e-6, 0.25, 40, "prv")
