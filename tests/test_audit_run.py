"""`storefed audit` on a tiny chain: with DP the lower bound stays under the ledger's ε;
without DP the same attack succeeds clearly, so the audit is able to fail.

σ is given (1.0) rather than calibrated, to keep the test fast; the ledger's ε is still
computed from the events the store ran. ~15 s of CPU for both runs.
"""

from __future__ import annotations

import json
import math

import pytest

from simulations.audit import AuditSettings, run_audit
from simulations.cli import main

TINY = dict(stores=1, canaries=100, members=150, items=300, rounds=2, seed=0, noise_multiplier=1.0)


@pytest.fixture(scope="module")
def with_dp():
    return run_audit(AuditSettings(epsilon=2.0, **TINY))


@pytest.fixture(scope="module")
def without_dp():
    return run_audit(AuditSettings(epsilon=None, **TINY))


def _r10(n: int) -> int:
    """The published size an audited store declares: n rounded up to the R10 grid (1, 1.25, 1.6,
    2, 2.5, 3.15, 4, 5, 6.3, 8 × 10^k), written out here by hand."""
    grid = sorted(math.ceil(round(m * 10 ** k, 6)) for k in range(1, 7)
                  for m in (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0))
    return next(g for g in grid if g >= n)


def test_with_dp_the_lower_bound_stays_under_the_ledger_epsilon(with_dp):
    import dp_accounting as dpa

    r = with_dp
    assert r["dp"] and r["noise_multiplier"] == 1.0
    # The mechanism follows the published size of the store with every canary in (the same
    # whichever canaries the coin put in): the trained members plus the canaries left out.
    published = _r10(r["members_audited_store"] + r["canaries"] - r["canaries_in"])
    steps = math.ceil(published / 128)
    assert r["delta"] == min(1e-6, 1 / (10 * published))
    # The ledger's ε against dp-accounting's PLD of 2 rounds at σ 1, q = 1/steps (not our accountant).
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(1 / steps, dpa.GaussianDpEvent(1.0)), 2 * steps)
    reference = dpa.pld.PLDAccountant().compose(event).get_epsilon(r["delta"])
    assert reference <= r["epsilon"] <= reference + 0.02
    assert 0.0 <= r["epsilon_lower_bound"] <= r["epsilon"]
    assert r["bound_within_epsilon"] is True
    assert r["canaries"] == 100 and 30 <= r["canaries_in"] <= 70
    # With DP the loss attack is near chance: under the null the AUC of n₁ in and n₀ out has
    # sd √((n₁ + n₀ + 1) / (12 n₁ n₀)); |AUC − ½| stays within 3.29 sd (two-sided 0.1 %).
    n1, n0 = r["canaries_in"], r["canaries"] - r["canaries_in"]
    assert abs(r["mia_auc"] - 0.5) < 3.29 * math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))


def test_without_dp_the_same_audit_clearly_succeeds(without_dp, with_dp):
    r = without_dp
    assert r["epsilon"] is None and r["bound_within_epsilon"] is None
    # 100 canaries at δ = 1e-6 cap any bound near 2.6; chance gives 0 and AUC ½.
    assert r["epsilon_lower_bound"] > 1.0
    assert r["mia_auc"] > 0.8
    assert r["epsilon_lower_bound"] > with_dp["epsilon_lower_bound"]
    assert r["canaries_in"] == with_dp["canaries_in"]  # same secret draw for the same seed


def test_cli_rejects_bad_numbers_in_one_line(capsys):
    assert main(["audit", "--epsilon", "nan", "--json"]) == 2
    assert main(["audit", "--canaries", "1"]) == 2
    err = capsys.readouterr().err
    assert "--epsilon must be a finite number" in err and "--canaries must be at least 2" in err


def test_json_keys_are_the_issue_contract(with_dp):
    decoded = json.loads(json.dumps(with_dp))
    assert {"epsilon", "epsilon_lower_bound", "canaries", "mia_auc"} <= set(decoded)
