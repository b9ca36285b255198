"""The one-run audit's ε lower bound (simulations.audit_bound) against hand-computed values,
exact binomial sums (math.comb) and scipy."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from simulations.audit_bound import binomial_pmf, epsilon_lower_bound, one_run_audit, p_value


def _exact_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's right-hand side with exact binomial coefficients (an independent sum)."""
    p = 1.0 / (1.0 + math.exp(-eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * alpha)


def test_binomial_pmf_matches_exact_fractions():
    r, p = 12, Fraction(3, 10)
    exact = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    assert np.allclose(binomial_pmf(r, 0.3), [float(x) for x in exact], rtol=1e-12, atol=0)
    assert np.allclose(binomial_pmf(300, 0.7), stats.binom.pmf(np.arange(301), 300, 0.7), rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("m,r,v,eps,delta", [(100, 20, 15, 0.5, 0.0), (100, 20, 15, 0.5, 1e-4),
                                              (1000, 100, 80, 1.3, 1e-5), (50, 10, 10, 2.0, 1e-3),
                                              (1000, 200, 100, 0.0, 1e-6)])
def test_p_value_is_the_theorem_right_hand_side(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_exact_p_value(m, r, v, eps, delta), rel=1e-9)
    if delta == 0:
        assert p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))), rel=1e-9)


def test_all_guesses_right_without_delta_has_a_closed_form():
    # r = v: P[Bin(r, p) ≥ r] = p^r < β  ⇔  p < β^(1/r)  ⇔  ε < logit(β^(1/r)).
    for r in (5, 10, 40):
        b = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(b / (1 - b)), abs=1e-5)


def test_hand_computed_case_with_delta():
    # m = r = v = 10, δ = 1e-3: p(ε) = p^10 + 0.02·max_i P[10−i ≤ Bin < 10]/i. Near the
    # answer (p ≈ 0.74) the max is at i = 3: (10p⁹q + 45p⁸q² + 120p⁷q³)/3 with q = 1 − p
    # (i = 1: 0.17, i = 2: 0.22, i = 3: 0.235, i = 4: 0.22), so solve that for p.
    def rhs(p):
        q = 1 - p
        return p**10 + 0.02 * (10 * p**9 * q + 45 * p**8 * q**2 + 120 * p**7 * q**3) / 3

    lo, hi = 0.5, 0.99
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rhs(mid) < 0.05 else (lo, mid)
    expected = math.log(lo / (1 - lo))
    got = epsilon_lower_bound(10, 10, 10, 1e-3, 0.95)
    assert got == pytest.approx(expected, abs=1e-4)
    assert got < epsilon_lower_bound(10, 10, 10, 0.0, 0.95)  # δ only ever lowers the bound


def test_chance_level_guessing_bounds_nothing():
    assert epsilon_lower_bound(1000, 100, 50, 1e-6) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, 1e-6) == 0.0
    # 60/100 right: P[Bin(100, ½) ≥ 60] = 0.028 < 0.05, so a small positive bound.
    assert 0.0 < epsilon_lower_bound(1000, 100, 60, 0.0) < 0.2


def test_one_run_audit_on_perfect_and_random_scores():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    perfect = one_run_audit(included.astype(float) + 1e-3 * rng.random(1000), included, delta=1e-6)
    assert perfect.epsilon_lower_bound > 4.0 and perfect.correct == perfect.guesses
    # With 1000 canaries and δ = 1e-6 no audit can go past the all-right bound at r = m.
    assert perfect.epsilon_lower_bound <= epsilon_lower_bound(1000, 1000, 1000, 1e-6) + 1e-9
    noise = one_run_audit(rng.random(1000), included, delta=1e-6)
    assert noise.epsilon_lower_bound < 0.5
    with pytest.raises(ValueError):
        one_run_audit([0.0, float("nan")], [True, False], delta=1e-6)
