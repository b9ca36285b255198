"""The store's own policy (issue 14, item 1): which run-config key is whose, and the attacks
of the issue's two tables replayed against a store's ClientApp on a generated store."""

from __future__ import annotations

import math
import re
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client.client_app as client_app
from server.operator_key import load_operator_key, make_operator_key
from client.state.ledger import ledger_path, read_events
from common.config import DEFAULTS, RANGES, RunConfig
from common.data.dataset import ItemIndex
from common.data.storefiles import read_catalog
from common.exchange import update_codec, wire
from common.learning.model import Recommender
from common.privacy import accountant as privacy
from client import store_policy
from common.privacy import run_signature
from client.store_policy import PolicyError

pytestmark = pytest.mark.usefixtures("task_identity")
ROOT = Path(__file__).resolve().parent.parent
DEPLOYED_MAY_READ = store_policy.keys_of("store") | store_policy.keys_of("tighten") | store_policy.keys_of("run")


def _message(chain_dir, kind, **config) -> Message:
    torch.manual_seed(0)
    model = Recommender(ItemIndex.from_catalog(read_catalog(chain_dir)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _deployed(chain_dir, state_dir, **node) -> dict:
    """A store daemon's node config, with the public key of a test operator (the runs below
    are signed with it, so that the policy, not the run authorization, decides)."""
    keys = Path(state_dir).parent / "operator"
    if not (keys / "operator.pub").exists():
        make_operator_key(keys)
    return {"store-dir": str(chain_dir / "stores" / "S001"), "catalog": str(chain_dir),
            "state-dir": str(state_dir), "operator-public-key": str(keys / "operator.pub"), **node}


def _signed(node_config, run_config) -> dict:
    """``run_config`` as `storefed train` sends it: signed by the operator (deployed stores only)."""
    if "operator-public-key" not in node_config:
        return run_config
    key = load_operator_key(Path(node_config["operator-public-key"]).with_name("operator.key"))
    added = run_signature.sign(run_config, key, expires=datetime.now(timezone.utc) + timedelta(hours=1),
                               nonce=secrets.token_hex(16), fab_hash="0" * 64)
    return {**run_config, **added}


def _run(chain_dir, node_config, run_config, kind=MessageType.TRAIN, **message_config) -> Message:
    """One message through the store's ClientApp, as a SuperNode would deliver it."""
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=_signed(node_config, run_config))
    return client_app.create_app()(_message(chain_dir, kind, **message_config), context)


@pytest.fixture
def sent(monkeypatch):
    """Every reply that reached the last step before leaving the store."""
    replies: list[Message] = []
    monkeypatch.setattr(client_app, "send", lambda reply: replies.append(reply) or reply)
    return replies


def _refusal(reply: Message) -> str:
    assert reply.has_error() and reply.error.code == wire.REFUSE_CODE
    info = wire.parse_refusal(reply.error.reason)
    assert set(info) == set(wire.REFUSE_KEYS)
    assert not reply.has_content()  # no weights, nothing about members
    return info["reason"]


# --- the classification ------------------------------------------------------------------

def test_every_run_config_key_is_classified_and_every_number_has_a_range():
    assert set(store_policy.WHO) == set(DEFAULTS)
    numbers = {k for k, v in DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers - set(RANGES) == set()
    for key in store_policy.keys_of("run") | store_policy.keys_of("tighten"):
        assert key in RANGES, key
    # The lists of names the ranges accept are the ones the code knows.
    from client.client_app import FAULTS
    from server.strategy import STRATEGIES
    assert RANGES["update-encoding"].choices == update_codec.ENCODINGS
    assert RANGES["accountant"].choices == privacy.ACCOUNTANTS
    assert set(RANGES["strategy"].choices) == set(STRATEGIES)
    assert RANGES["fault"].choices == ("", *FAULTS)


def test_the_store_reads_only_classified_keys_and_a_deployed_store_only_its_own_kinds(small_chain_dir, tmp_path,
                                                                                       monkeypatch, sent):
    """A real train and evaluate message through the ClientApp, recording every run-config
    key the store's code reads. A key read by a store must be classified for the store: a
    deployed store may read only store / tighten / run keys, a simulated one no server key."""
    reads: set[str] = set()
    original = RunConfig.__getitem__

    def recording(self, key):
        reads.add(key)
        return original(self, key)

    monkeypatch.setattr(RunConfig, "__getitem__", recording)
    run = {"data-dir": str(small_chain_dir), "rounds": 2, "stores": 3}  # noise-multiplier 0: σ calibrated
    # RDP: the same keys are read as with PRV, in a fraction of the time.
    node = _deployed(small_chain_dir, tmp_path / "deployed", **{"allow-local-metrics": True, "accountant": "rdp"})
    assert not _run(small_chain_dir, node, run).has_error()
    assert not _run(small_chain_dir, node, run, MessageType.EVALUATE).has_error()
    deployed = set(reads)
    assert deployed <= DEPLOYED_MAY_READ, deployed - DEPLOYED_MAY_READ
    # The deployed store's noise does not come from the run's seed (it draws it from the OS).
    assert "seed" not in deployed and {"noise-multiplier", "target-epsilon", "clip-norm", "delta"} <= deployed

    reads.clear()
    sim = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "sim")}
    assert not _run(small_chain_dir, sim, {**run, "dp": False, "fault": "nan", "fault-stores": 1}).has_error()
    assert not _run(small_chain_dir, sim, run, MessageType.EVALUATE).has_error()
    simulated = set(reads)
    assert simulated & store_policy.keys_of("server") == set()
    assert simulated <= set(store_policy.WHO)
    assert {"seed", "lr", "fault"} <= simulated  # the simulation-only keys are read there
    assert len(sent) == 4


def test_the_readme_table_is_the_policy():
    text = (ROOT / "client" / "README.md").read_text(encoding="utf-8")
    section = text.split("### Who sets what at a deployed store", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| (\w+) \| ([^|]*) \|", section, flags=re.M)
    assert {key: who for key, who, _ in rows} == {key: who for key, (who, _) in store_policy.WHO.items()}
    for key, _, rng in rows:
        expected = RANGES[key].text() if key in RANGES else (
            "true or false" if isinstance(DEFAULTS[key], bool) else
            "text" if key in store_policy.keys_of("signature") else "a path")
        assert rng.strip() == expected, key


# --- the first table: switching a deployed store's privacy off from outside ---------

def test_a_deployed_store_refuses_to_train_without_dp(small_chain_dir, tmp_path, sent):
    reply = _run(small_chain_dir, _deployed(small_chain_dir, tmp_path), {"dp": False, "noise-multiplier": 1.0})
    assert _refusal(reply).startswith("run config dp=False: a deployed store trains only with DP")
    assert not ledger_path(tmp_path).exists() and sent == []


def test_a_deployed_store_keeps_its_ledger_where_it_is_whatever_the_run_says(small_chain_dir, tmp_path, sent):
    elsewhere = tmp_path / "the-servers-choice"
    reply = _run(small_chain_dir, _deployed(small_chain_dir, tmp_path / "state"),
                 {"state-dir": str(elsewhere), "noise-multiplier": 1.0})
    assert "a deployed store keeps its ledger in its own state directory" in _refusal(reply)
    assert not elsewhere.exists() and not ledger_path(tmp_path / "state").exists() and sent == []
    # Called without the ClientApp's policy, the store still never puts its ledger there.
    from client.state.paths import state_dir_for
    cfg = RunConfig.from_mapping({"state-dir": str(elsewhere)})
    store_dir = small_chain_dir / "stores" / "S001"
    assert state_dir_for(store_dir, {"store-dir": str(store_dir)}, cfg, "S001") == store_dir / "state"


def test_budget_and_delta_are_the_stores_and_a_run_may_only_lower_them(small_chain_dir, tmp_path, sent):
    node = _deployed(small_chain_dir, tmp_path, accountant="rdp")
    # Asking for more (budget 100, δ 1e-3) and another accountant: the store's own apply. One
    # local epoch, so that a round at σ 1 fits in the store's ε 8 (at the default 2 epochs it
    # would bring ε to 8.33 under rdp, and the store would decline).
    reply = _run(small_chain_dir, node, {"epsilon-budget": 100.0, "delta": 1e-3, "accountant": "prv",
                                         "noise-multiplier": 1.0, "local-epochs": 1})
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    assert metrics["epsilon-budget"] == 8.0 and metrics["delta"] == 1e-6
    assert reply.content["store"]["accountant"] == "rdp"
    (event,) = read_events(tmp_path, "S001")
    assert event.delta == 1e-6 and event.accountant == "rdp" and event.noise_multiplier == 1.0
    spent = privacy.epsilon([event.mechanism()], 1e-6, "rdp")
    assert metrics["epsilon"] == pytest.approx(spent, rel=1e-12)
    # Asking for less is honoured: a lower budget and a smaller δ (here: a decline at them).
    low_budget = round(spent / 2, 6)
    reply = _run(small_chain_dir, node, {"epsilon-budget": low_budget, "delta": 1e-8, "noise-multiplier": 1.0,
                                         "local-epochs": 1})
    assert reply.has_error() and reply.error.code == wire.DECLINE_CODE
    info = wire.parse_decline(reply.error.reason)
    assert info["epsilon-budget"] == low_budget and info["delta"] == 1e-8 and info["accountant"] == "rdp"
    assert info["epsilon"] == pytest.approx(privacy.epsilon([event.mechanism()], 1e-8, "rdp"), rel=1e-12)
    assert len(read_events(tmp_path, "S001")) == 1  # nothing more spent
    assert len(sent) == 2 and not sent[1].has_content()  # the decline carries no weights


# --- the second table: numbers outside their range, deployed and simulated ---------

ATTACKS = [
    ({"clip-norm": -1.0, "noise-multiplier": 50.0}, "run config 'clip-norm' must be a finite number > 0 and ≤ 1e+06, got -1.0"),
    ({"epsilon-budget": math.nan}, "run config 'epsilon-budget' must be a finite number > 0, got nan"),
    ({"delta": 1.0}, "run config 'delta' must be a finite number ≥ 1e-30 and < 1, got 1.0"),
    ({"noise-multiplier": 0.01}, "run config 'noise-multiplier' must be 0, or a finite number ≥ 0.3 and ≤ 100, got 0.01"),
]


@pytest.mark.parametrize("simulated", [False, True])
@pytest.mark.parametrize("run_config,reason", ATTACKS)
def test_an_out_of_range_number_is_refused_before_anything_is_read(small_chain_dir, tmp_path, sent, simulated,
                                                                   run_config, reason, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the store read its data for a refused run")

    monkeypatch.setattr(client_app, "load_store", no_data)
    node = ({"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path)} if simulated
            else _deployed(small_chain_dir, tmp_path, **{"epsilon-budget": 1.0}))
    reply = _run(small_chain_dir, node, {"data-dir": str(small_chain_dir), "stores": 3, **run_config})
    assert _refusal(reply) == reason
    assert not ledger_path(tmp_path).exists() and sent == []


@pytest.mark.parametrize("conf, reason", [
    ({"proximal-mu": math.nan}, "message config 'proximal-mu' must be a finite number ≥ 0 and ≤ 10, got nan"),
    ({"proximal-mu": 10.5}, "message config 'proximal-mu' must be a finite number ≥ 0 and ≤ 10, got 10.5"),
    ({"server-round": 1_000_001}, "message config 'server-round' must be an integer ≥ 0 and ≤ 1e+06, got 1000001"),
    # dp-lr 2 (the default) × μ 0.5 = 1: the proximal pull would no longer damp the weights.
    ({"proximal-mu": 0.5}, "FedProx proximal-mu 0.5 with dp-lr 2: their product must be below 1, or the "
                           "proximal term would make the weights diverge; lower either"),
    ({"anything": math.inf}, "message config 'anything' must be a finite number, got inf"),
])
def test_a_message_config_number_out_of_range_is_refused(small_chain_dir, tmp_path, sent, conf, reason):
    reply = _run(small_chain_dir, _deployed(small_chain_dir, tmp_path), {}, **conf)
    assert _refusal(reply) == reason
    assert sent == [] and not ledger_path(tmp_path).exists()


# --- the pure parts -----------------------------------------------------------------------

def test_a_stores_own_settings_are_checked_and_name_where_they_come_from():
    own = store_policy.own_settings({"epsilon-budget": 12.0}, {"epsilon_budget": 3.0, "delta": 1e-7}, "S/store.json")
    assert own == store_policy.OwnSettings(epsilon_budget=3.0, delta=1e-7, accountant=None)
    with pytest.raises(PolicyError, match=r"^node config 'epsilon-budget' must be a finite number > 0, got 'nan'"):
        store_policy.own_settings({"epsilon-budget": "nan"}, {})
    with pytest.raises(PolicyError, match=r"^S/store.json 'delta' must be a finite number ≥ 1e-30 and < 1, got 1.5"):
        store_policy.own_settings({}, {"delta": 1.5}, "S/store.json")
    with pytest.raises(PolicyError, match="not a finite number"):
        store_policy.tightened(math.nan, [8.0])
    # A simulation takes the run's budget and δ as given; a deployed store caps them at its defaults.
    none = store_policy.OwnSettings()
    assert store_policy.effective_budget(100.0, none, deployed=False) == 100.0
    assert store_policy.effective_budget(100.0, none, deployed=True) == 8.0
    assert store_policy.effective_delta(1e-3, none, deployed=True) == 1e-6
    assert store_policy.effective_delta(1e-9, store_policy.OwnSettings(delta=1e-7), deployed=True) == 1e-9


def test_calibration_never_goes_below_the_smallest_noise_the_accountant_handles():
    # Any target this large is met by the floor itself, so calibration returns the floor.
    assert privacy.calibrate_noise(1e6, 1e-6, 0.1, 10) == privacy.MIN_NOISE_MULTIPLIER
    with pytest.raises(ValueError, match="finite"):
        privacy.calibrate_noise(math.nan, 1e-6, 0.1, 10)


@pytest.mark.parametrize("key,value", [("clip-norm", -1.0), ("clip-norm", math.inf), ("epsilon-budget", math.nan),
                                       ("epsilon-budget", 0.0), ("delta", 1.0), ("delta", 0.0), ("delta", 5e-324),
                                       ("target-epsilon", -math.inf), ("trim-beta", 0.5), ("fraction-train", 0.0),
                                       ("server-momentum", math.nan), ("batch-size", 0), ("accountant", "none")])
def test_the_run_config_itself_rejects_numbers_out_of_range_for_the_server_too(key, value):
    from common.config import ConfigError
    with pytest.raises(ConfigError, match=rf"^run config '{key}' must be "):
        RunConfig.from_mapping({key: value})
