"""common.privacy.run_signature: the signed bytes written out by hand, the key id recomputed
with hashlib, a fixed key's signature checked with the cryptography library directly, and every
refusal's text (kills the mutants tests/test_run_signature.py leaves alive)."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.privacy import run_signature as rs

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
FAB = "ab" * 32
NONCE = "0123456789abcdef"  # exactly 16 characters


def _kid(key=KEY):
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def test_the_canonical_bytes_by_hand():
    got = rs.canonical({"z": "é", "b": False, "a": -3, "f": 0.5, "inf": float("inf"), "run-signature": "x"})
    assert got == (b"storefed-run-authorization-v1\n"
                   b'[["a","int","-3"],["b","bool",false],["f","float","0x1.0000000000000p-1"],'
                   b'["inf","float","inf"],["z","str","\\u00e9"]]')
    assert rs.canonical({}) == b"storefed-run-authorization-v1\n[]"
    assert rs.canonical({"n": float("nan")}).endswith(b'[["n","float","nan"]]')
    with pytest.raises(rs.RunSignatureError) as err:
        rs.canonical({"k": None})
    assert str(err.value) == "run config 'k' has a value of type NoneType; only bool, int, float and str can be signed"


def test_key_id_and_times():
    assert rs.key_id(KEY.public_key()) == _kid() and len(_kid()) == 16
    assert rs.format_time(datetime(2026, 1, 2, 3, 4, 5, 999, tzinfo=timezone.utc)) == "2026-01-02T03:04:05Z"
    later = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert rs.format_time(later) == "2026-01-02T03:04:05Z"
    assert rs.parse_time("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    for bad in ("2026-01-02 03:04:05", None, "2026-01-02T03:04:05+00:00"):
        with pytest.raises(rs.RunSignatureError) as err:
            rs.parse_time(bad)
        assert str(err.value) == f"run-expires {bad!r} is not a UTC time YYYY-MM-DDTHH:MM:SSZ"


def _signed(config=None, *, expires=NOW + timedelta(hours=1), nonce=NONCE):
    config = dict(config if config is not None else {"dp": True, "rounds": 3, "delta": 1e-6})
    return {**config, **rs.sign(config, KEY, expires=expires, nonce=nonce, fab_hash=FAB)}


def test_sign_adds_exactly_the_five_keys_and_the_signature_is_over_the_canonical_bytes():
    config = {"dp": True, "rounds": 3, "run-nonce": "stale", "run-signature": "stale"}
    added = rs.sign(config, KEY, expires=NOW, nonce=NONCE, fab_hash=FAB)
    assert set(added) == {"run-expires", "run-nonce", "run-fab-hash", "operator-key-id", "run-signature"}
    assert {k: v for k, v in added.items() if k != "run-signature"} == {
        "run-expires": "2026-11-30T12:00:00Z", "run-nonce": NONCE, "run-fab-hash": FAB, "operator-key-id": _kid()}
    payload = rs.canonical({"dp": True, "rounds": 3, **added})
    KEY.public_key().verify(base64.b64decode(added["run-signature"]), payload)  # raises if not
    with pytest.raises(rs.RunSignatureError) as err:
        rs.sign(config, KEY, expires=NOW, nonce="x" * 15, fab_hash=FAB)
    assert str(err.value) == "a nonce needs at least 16 characters (use secrets.token_hex(16))"


def test_verify_returns_what_the_signature_vouches_for():
    run = _signed()
    assert rs.verify(run, KEY.public_key(), NOW) == rs.Authorization(NOW + timedelta(hours=1), NONCE, FAB, _kid())
    # valid for exactly the longest allowed time
    week = _signed(expires=NOW + timedelta(days=7))
    assert rs.verify(week, KEY.public_key(), NOW).expires == NOW + timedelta(days=7)


@pytest.mark.parametrize("change,message", [
    ({"run-signature": ""}, "the run is not signed (no run-signature in its run config); start runs with 'storefed train'"),
    ({"run-signature": 5}, "the run is not signed (no run-signature in its run config); start runs with 'storefed train'"),
    ({"run-expires": ""}, "the run's signature comes without 'run-expires'"),
    ({"run-nonce": 3}, "the run's signature comes without 'run-nonce'"),
    ({"run-fab-hash": None}, "the run's signature comes without 'run-fab-hash'"),
    ({"operator-key-id": ""}, "the run's signature comes without 'operator-key-id'"),
    ({"run-signature": "not base64!"}, "run-signature is not base64"),
    ({"run-signature": "é"}, "run-signature is not base64"),
    ({"operator-key-id": "ffffffffffffffff"},
     f"the run is signed by key ffffffffffffffff, not by this chain's operator key {_kid()}"),
    ({"rounds": 4}, "the run's signature does not match its run config (changed after signing, or not signed "
                    "by the operator)"),
])
def test_each_refusal_has_its_exact_text(change, message):
    with pytest.raises(rs.RunSignatureError) as err:
        rs.verify({**_signed(), **change}, KEY.public_key(), NOW)
    assert str(err.value) == message


def test_expiry_and_validity_texts_and_boundaries():
    run = _signed()
    with pytest.raises(rs.RunSignatureError) as err:
        rs.verify(run, KEY.public_key(), NOW + timedelta(hours=1))  # at the expiry itself: expired
    assert str(err.value) == "the run's authorization expired at 2026-11-30T13:00:00Z (now 2026-11-30T13:00:00Z)"
    long = _signed(expires=NOW + timedelta(days=7, seconds=1))
    with pytest.raises(rs.RunSignatureError) as err:
        rs.verify(long, KEY.public_key(), NOW)
    assert str(err.value) == ("the run's authorization lasts until 2026-12-07T12:00:01Z, longer than the 7 days "
                              "a store accepts")
    assert rs.verify(long, KEY.public_key(), NOW + timedelta(seconds=1))
