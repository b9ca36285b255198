"""`storefed audit` on a tiny chain: with DP the lower bound stays under the ledger's ε;
without DP the same attack succeeds clearly, so the audit is able to fail.

σ is given (1.0) rather than calibrated, to keep the test fast; the ledger's ε is still
computed from the events the store ran. ~15 s of CPU for both runs.
"""

from __future__ import annotations

import json

import pytest

from common.privacy import accountant as privacy
from simulations.audit import AuditSettings, run_audit
from simulations.cli import main

TINY = dict(stores=1, canaries=100, members=150, items=300, rounds=2, seed=0, noise_multiplier=1.0)


@pytest.fixture(scope="module")
def with_dp():
    return run_audit(AuditSettings(epsilon=2.0, **TINY))


@pytest.fixture(scope="module")
def without_dp():
    return run_audit(AuditSettings(epsilon=None, **TINY))


def test_with_dp_the_lower_bound_stays_under_the_ledger_epsilon(with_dp):
    r = with_dp
    assert r["dp"] and r["noise_multiplier"] == 1.0
    # The ledger's ε is the accountant's ε of what ran: 2 rounds at σ 1, q = 1/⌈n/128⌉.
    q = 1.0 / -(-r["members_audited_store"] // 128)
    steps = int(1 / q)
    assert r["epsilon"] == pytest.approx(privacy.epsilon([(1.0, q, steps)] * 2, r["delta"]), rel=1e-9)
    assert 0.0 <= r["epsilon_lower_bound"] <= r["epsilon"]
    assert r["bound_within_epsilon"] is True
    assert 0.0 <= r["mia_auc"] <= 1.0 and r["canaries"] == 100 and 30 <= r["canaries_in"] <= 70


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
