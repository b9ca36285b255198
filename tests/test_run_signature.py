"""Signed runs without processes: the canonical form, tampering, expiry, the store's checks."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.run_authorization import NONCE_FILE, RunNotAuthorized, authorize
from common.config import DEFAULTS
from common.privacy import run_signature as rs
from server.operator_key import load_operator_key, make_operator_key

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
FAB = "ab" * 32


def _signed(key, config=None, *, expires=NOW + timedelta(hours=1), nonce="n" * 32):
    config = dict(config if config is not None else {**DEFAULTS, "stores": 3, "delta": 1e-6})
    return {**config, **rs.sign(config, key, expires=expires, nonce=nonce, fab_hash=FAB)}


def test_canonical_form_is_sorted_typed_and_exact():
    a = rs.canonical({"b": 1, "a": True, "c": 0.1, "d": "x", rs.SIGNATURE_KEY: "ignored"})
    b = rs.canonical({"d": "x", "c": 0.1, "a": True, "b": 1})
    assert a == b
    rows = json.loads(a[len(rs.DOMAIN):])
    assert rows == [["a", "bool", True], ["b", "int", "1"], ["c", "float", (0.1).hex()], ["d", "str", "x"]]
    # 1 and 1.0, True and 1, 0.1 and its neighbour, NaN and a string "nan" all differ.
    assert rs.canonical({"k": 1}) != rs.canonical({"k": 1.0}) != rs.canonical({"k": True})
    assert rs.canonical({"k": 0.1}) != rs.canonical({"k": 0.1 + 2 ** -56})
    assert rs.canonical({"k": float("nan")}) != rs.canonical({"k": "nan"})
    with pytest.raises(rs.RunSignatureError, match="type list"):
        rs.canonical({"k": [1]})


def test_a_signed_run_verifies_and_any_change_breaks_it():
    key = Ed25519PrivateKey.generate()
    run = _signed(key)
    auth = rs.verify(run, key.public_key(), NOW)
    assert auth.nonce == "n" * 32 and auth.fab_hash == FAB and auth.expires == NOW + timedelta(hours=1)
    for change in ({"dp": False}, {"delta": 1e-6 + 1e-20}, {"state-dir": "/tmp/empty"}, {"stores": 3.0},
                   {"clip-norm": -1.0}, {rs.NONCE_KEY: "m" * 32}, {rs.FAB_HASH_KEY: "cd" * 32},
                   {rs.EXPIRES_KEY: rs.format_time(NOW + timedelta(days=1))}, {"new-key": 1}):
        with pytest.raises(rs.RunSignatureError, match="does not match"):
            rs.verify({**run, **change}, key.public_key(), NOW)
    without = {k: v for k, v in run.items() if k != "epsilon-budget"}
    with pytest.raises(rs.RunSignatureError, match="does not match"):
        rs.verify(without, key.public_key(), NOW)


def test_unsigned_expired_too_long_and_foreign_key_runs_fail():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with pytest.raises(rs.RunSignatureError, match="not signed"):
        rs.verify(dict(DEFAULTS), key.public_key(), NOW)
    run = _signed(key)
    with pytest.raises(rs.RunSignatureError, match="expired at 2026-11-30T13:00:00Z"):
        rs.verify(run, key.public_key(), NOW + timedelta(hours=1))
    assert rs.verify(run, key.public_key(), NOW + timedelta(minutes=59, seconds=59))
    with pytest.raises(rs.RunSignatureError, match="longer than the 7 days"):
        rs.verify(_signed(key, expires=NOW + timedelta(days=8)), key.public_key(), NOW)
    with pytest.raises(rs.RunSignatureError, match=f"not by this chain's operator key {rs.key_id(key.public_key())}"):
        rs.verify(_signed(other), key.public_key(), NOW)
    # Another key that claims the operator's key id still fails on the signature itself.
    forged = {**_signed(other), rs.KEY_ID_KEY: rs.key_id(key.public_key())}
    with pytest.raises(rs.RunSignatureError, match="does not match"):
        rs.verify(forged, key.public_key(), NOW)


def test_operator_key_files(tmp_path):
    private, public = make_operator_key(tmp_path / "op")
    assert oct(private.stat().st_mode & 0o777) == "0o600" and public.read_text().startswith("-----BEGIN PUBLIC KEY")
    key = load_operator_key(private)
    from client.run_authorization import load_public_key
    assert rs.key_id(load_public_key(public)) == rs.key_id(key.public_key())
    from common.data.storefiles import DataError
    with pytest.raises(DataError, match="already exists"):
        make_operator_key(tmp_path / "op")


def _store(tmp_path, small_chain_dir, key_path=None):
    node = {"store-dir": str(small_chain_dir / "stores" / "S001"), "catalog": str(small_chain_dir),
            "state-dir": str(tmp_path / "state")}
    if key_path:
        node["operator-public-key"] = str(key_path)
    return node


def test_the_store_checks_signature_expiry_and_nonce(tmp_path, small_chain_dir):
    private, public = make_operator_key(tmp_path / "op")
    key = load_operator_key(private)
    node = _store(tmp_path, small_chain_dir, public)
    run = _signed(key)
    # The same run, many messages: accepted every time, even after its expiry.
    assert authorize(node, run, 5, NOW).nonce == "n" * 32
    assert authorize(node, run, 5, NOW + timedelta(hours=3)).nonce == "n" * 32
    seen = json.loads((tmp_path / "state" / NONCE_FILE).read_text())
    assert seen == {"n" * 32: {"run_id": "5", "first_seen": "2026-11-30T12:00:00Z", "expires": "2026-11-30T13:00:00Z"}}
    with pytest.raises(RunNotAuthorized, match="replayed run: nonce n{32} was already used by run 5, this is run 6"):
        authorize(node, run, 6, NOW)
    with pytest.raises(RunNotAuthorized, match="expired"):
        authorize(node, _signed(key, nonce="e" * 32), 7, NOW + timedelta(hours=2))
    with pytest.raises(RunNotAuthorized, match="not signed"):
        authorize(node, dict(DEFAULTS), 8, NOW)
    assert set(json.loads((tmp_path / "state" / NONCE_FILE).read_text())) == {"n" * 32}  # refusals record nothing
    # Fail closed: a deployed store with no key refuses; a simulated one is exempt.
    with pytest.raises(RunNotAuthorized, match="no operator public key"):
        authorize(_store(tmp_path, small_chain_dir), run, 5, NOW)
    assert authorize({"partition-id": 0, "num-partitions": 3}, dict(DEFAULTS), 5, NOW) is None
    (tmp_path / "state" / NONCE_FILE).write_text("{not json")
    with pytest.raises(RunNotAuthorized, match="unreadable"):
        authorize(node, run, 5, NOW)


def test_the_client_app_refuses_an_unsigned_run_before_reading_any_store_file(tmp_path, small_chain_dir,
                                                                                task_identity):
    """Through the ClientApp itself: a store whose transactions file is gone refuses for the
    signature, not for the file (it never looked); signed, it gets as far as the file."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from client.client_app import app
    from common.exchange import wire

    store = tmp_path / "S001"
    shutil.copytree(small_chain_dir / "stores" / "S001", store)
    (store / "transactions.csv").unlink()
    private, public = make_operator_key(tmp_path / "op")
    node = {"store-dir": str(store), "catalog": str(small_chain_dir), "operator-public-key": str(public)}

    from flwr.app import ArrayRecord

    from common.data.dataset import ItemIndex
    from common.data.storefiles import read_catalog
    from common.learning.model import Recommender

    # A well-formed model, so that the store's own checks of the message pass and the data is next.
    arrays = Recommender(ItemIndex.from_catalog(read_catalog(small_chain_dir))).state_dict()

    def reply(run_config):
        context = Context(run_id=3, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
        msg = Message(content=RecordDict({wire.TRAIN_ARRAYS: ArrayRecord(arrays)}), dst_node_id=7,
                      message_type=MessageType.TRAIN)
        return wire.parse_refusal(app(msg, context).error.reason)["reason"]

    assert reply({**DEFAULTS, "dp": False}).startswith("the run is not signed")
    signed = _signed(load_operator_key(private), {**DEFAULTS, "data-dir": str(small_chain_dir)},
                     expires=datetime.now(timezone.utc) + timedelta(minutes=5))
    assert "transactions" in reply(signed)


def test_a_store_checks_the_fab_as_data_name_version_and_the_signed_hash(tmp_path):
    import hashlib
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk

    from client.daemon.fab_check import FabRefused, check_fab, fab_identity, wire_compatible

    foreign = Path(__file__).resolve().parent / "foreign_app"
    fab = build_fab_from_disk(foreign)
    digest = hashlib.sha256(fab).hexdigest()
    assert fab_identity(fab).name == "storefed" and fab_identity(fab).version == "0.1.0"
    assert check_fab(digest, fab, {rs.FAB_HASH_KEY: digest}, "0.1.0").publisher == "storefed"
    with pytest.raises(FabRefused, match="the run is not signed"):
        check_fab(digest, fab, {}, "0.1.0")
    with pytest.raises(FabRefused, match=f"the run's app \\(FAB {digest[:12]}\\) is not the app the operator signed"):
        check_fab(digest, fab, {rs.FAB_HASH_KEY: FAB}, "0.1.0")
    with pytest.raises(FabRefused, match="does not match its own hash"):
        check_fab(FAB, fab, {rs.FAB_HASH_KEY: FAB}, "0.1.0")
    with pytest.raises(FabRefused, match="the server runs storefed 0.1.0 and this store runs storefed 0.2.1"):
        check_fab(digest, fab, {rs.FAB_HASH_KEY: digest}, "0.2.1")
    with pytest.raises(FabRefused, match="not a Flower app archive"):
        check_fab(hashlib.sha256(b"junk").hexdigest(), b"junk", {}, "0.1.0")
    other = tmp_path / "other"
    shutil.copytree(foreign, other)
    (other / "pyproject.toml").write_text((other / "pyproject.toml").read_text().replace('name = "storefed"',
                                                                                          'name = "peek"'))
    fab2 = build_fab_from_disk(other)
    with pytest.raises(FabRefused, match="the run's app is 'peek', not storefed"):
        check_fab(hashlib.sha256(fab2).hexdigest(), fab2, {}, "0.1.0")
    assert wire_compatible("0.1.0", "0.1.7") and not wire_compatible("0.1.0", "0.2.0")
    assert not wire_compatible("1.1", "0.1.0") and not wire_compatible("", "0.1.0")
