"""client.store_policy: who decides each setting, checked value by value against
hand-written expectations and exact messages (kills the mutants tests/test_store_policy.py
leaves alive). Pure: no store, no Flower."""

from __future__ import annotations

import math

import pytest

from client import store_policy as sp
from client.store_policy import OwnSettings, PolicyError


def test_keys_of_each_class_is_exactly_the_table():
    assert sp.keys_of("store") == {"dp", "state-dir", "accountant"}
    assert sp.keys_of("tighten") == {"epsilon-budget", "delta"}
    assert sp.keys_of("signature") == {"run-signature", "run-expires", "run-nonce", "run-fab-hash",
                                       "operator-key-id"}
    assert sp.keys_of("nothing") == set()


def test_own_settings_takes_the_smaller_number_and_the_node_configs_accountant_first():
    own = sp.own_settings({"epsilon-budget": 5, "delta": 1e-7, "accountant": "rdp"},
                          {"epsilon_budget": 6.0, "epsilon-budget": "4.5", "delta": 1e-8, "accountant": "prv"})
    assert own == OwnSettings(epsilon_budget=4.5, delta=1e-8, accountant="rdp")
    own = sp.own_settings({"epsilon_budget": 2.0}, {"accountant": "prv"})
    assert own == OwnSettings(epsilon_budget=2.0, delta=None, accountant="prv")
    # empty and zero mean "not set" (δ 0 is the node config's "unset")
    assert sp.own_settings({"epsilon-budget": "", "delta": 0, "accountant": ""},
                           {"epsilon_budget": None, "delta": ""}) == OwnSettings()
    assert sp.own_settings({}, {}) == OwnSettings(None, None, None)


@pytest.mark.parametrize("node,meta,message", [
    ({"epsilon-budget": True}, {}, "node config 'epsilon-budget' must be a finite number > 0, got True"),
    ({"epsilon_budget": "lots"}, {}, "node config 'epsilon_budget' must be a finite number > 0, got 'lots'"),
    ({"epsilon-budget": None}, {"epsilon_budget": [1]},
     "M.json 'epsilon_budget' must be a finite number > 0, got [1]"),
    ({"epsilon-budget": 0.0}, {},
     "node config 'epsilon-budget' must be a finite number > 0, got 0.0; fix the store's setting"),
    ({}, {"delta": 1.0}, "M.json 'delta' must be a finite number ≥ 1e-30 and < 1, got 1.0; fix the store's setting"),
    ({"accountant": "gdp"}, {},
     "node config 'accountant' must be one of prv, rdp, got 'gdp'; fix the store's setting"),
    ({}, {"accountant": "PRV"}, "M.json 'accountant' must be one of prv, rdp, got 'PRV'; fix the store's setting"),
])
def test_an_unusable_own_setting_is_refused_with_the_exact_message(node, meta, message):
    with pytest.raises(PolicyError) as err:
        sp.own_settings(node, meta, "M.json")
    assert str(err.value) == message


def test_the_default_file_name_is_store_json():
    with pytest.raises(PolicyError) as err:
        sp.own_settings({}, {"delta": 2})
    assert str(err.value).startswith("store.json 'delta' must be")


def test_tightened_is_the_minimum_and_refuses_non_finite_values():
    assert sp.tightened(3.0, [None, 5.0, 2.5, None]) == 2.5
    assert sp.tightened(3.0, []) == 3.0
    assert sp.tightened("1.5", [2]) == 1.5
    for bad in ([math.inf], [math.nan], [None, -math.inf]):
        with pytest.raises(PolicyError) as err:
            sp.tightened(1.0, bad)
        assert str(err.value) == f"a privacy setting is not a finite number: {[1.0, *[float(v) for v in bad if v is not None]]}"
    with pytest.raises(PolicyError):
        sp.tightened(math.inf, [1.0])


def test_effective_budget_and_delta_by_hand():
    none, own = OwnSettings(), OwnSettings(epsilon_budget=3.0, delta=1e-7)
    assert sp.effective_budget(10.0, none, deployed=True) == 8.0
    assert sp.effective_budget(6.0, none, deployed=True) == 6.0
    assert sp.effective_budget(10.0, none, deployed=False) == 10.0
    assert sp.effective_budget(10.0, own, deployed=True) == 3.0
    assert sp.effective_budget(10.0, own, deployed=False) == 3.0
    # a store's own budget above the default 8 is its own choice: the default no longer applies
    assert sp.effective_budget(20.0, OwnSettings(epsilon_budget=12.0), deployed=True) == 12.0
    assert sp.effective_delta(1e-3, none, deployed=True) == 1e-6
    assert sp.effective_delta(1e-3, none, deployed=False) == 1e-3
    assert sp.effective_delta(1e-3, own, deployed=True) == 1e-7
    assert sp.effective_delta(1e-3, OwnSettings(delta=1e-5), deployed=True) == 1e-5
    assert sp.effective_delta(1e-9, own, deployed=False) == 1e-9


def test_refusals_name_each_reason_exactly():
    assert sp.refusals({"dp": True}) == []
    assert sp.refusals({"dp": True, "state-dir": "", "dp-path": "bookkeeping"}) == []
    reasons = sp.refusals({"dp": 1, "state-dir": "/tmp/x", "dp-path": "opacus"})
    assert reasons == [
        "run config dp=1: a deployed store trains only with DP; remove dp from the run config",
        "run config state-dir='/tmp/x': a deployed store keeps its ledger in its own state directory "
        "(node config state-dir or <store-dir>/state); remove state-dir from the run config",
        "run config dp-path='opacus': a deployed store draws its noise from a cryptographically secure "
        "stream, which only the book-keeping path has; remove dp-path from the run config",
    ]
    assert sp.refusals({}) == ["run config dp=None: a deployed store trains only with DP; "
                               "remove dp from the run config"]


def test_deployed_values_use_the_stores_accountant_and_tightened_numbers():
    values = {"accountant": "rdp", "epsilon-budget": "20", "delta": 1e-3}
    assert sp.deployed_values(values, OwnSettings()) == {"accountant": "prv", "epsilon-budget": 8.0,
                                                         "delta": 1e-6}
    assert sp.deployed_values(values, OwnSettings(4.0, 1e-8, "rdp")) == {"accountant": "rdp",
                                                                        "epsilon-budget": 4.0, "delta": 1e-8}


@pytest.mark.parametrize("config,message", [
    ({"server-round": -1}, "message config 'server-round' must be an integer ≥ 0 and ≤ 1e+06, got -1"),
    ({"server-round": True}, "message config 'server-round' must be an integer ≥ 0 and ≤ 1e+06, got True"),
    ({"server-round": "1"}, "message config 'server-round' must be an integer ≥ 0 and ≤ 1e+06, got '1'"),
    ({"server-round": 1, "proximal-mu": -0.5}, "message config 'proximal-mu' must be a finite number ≥ 0 and ≤ 10, got -0.5"),
    ({"proximal-mu": math.nan}, "message config 'proximal-mu' must be a finite number ≥ 0 and ≤ 10, got nan"),
])
def test_message_config_out_of_range_is_refused_exactly(config, message):
    with pytest.raises(PolicyError) as err:
        sp.check_message_config(config)
    assert str(err.value) == message


def test_message_config_in_range_or_absent_passes():
    sp.check_message_config({})
    sp.check_message_config({"server-round": 0, "proximal-mu": 0.0, "other": "anything"})
    sp.check_message_config({"server-round": 3, "proximal-mu": 2})
