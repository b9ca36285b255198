"""Signed runs: the chain's operator authorizes a run by signing its run config (ed25519).

The signature travels inside the run config itself, so Flower carries it to the stores
unchanged. It covers every other run-config key — the training settings and four keys of
its own: when the authorization expires, a nonce (one run, never two), the SHA-256 of the
FAB the run was started with, and the id of the key that signed. A store verifies it with
the operator's public key from its own configuration before it reads any data
(client/run_authorization.py).

Pure: no Flower, no files. The canonical form is exact: keys sorted, every value written
with its type (bool, int, float, str), floats in hexadecimal so that no value has two
spellings and no two values share one (1 and 1.0, 0.1 and its neighbour, NaN).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_KEY = "run-signature"
EXPIRES_KEY = "run-expires"
NONCE_KEY = "run-nonce"
FAB_HASH_KEY = "run-fab-hash"
KEY_ID_KEY = "operator-key-id"
# Run-config keys of the authorization; all but the signature itself are signed.
AUTH_KEYS = (SIGNATURE_KEY, EXPIRES_KEY, NONCE_KEY, FAB_HASH_KEY, KEY_ID_KEY)
DOMAIN = b"storefed-run-authorization-v1\n"  # a signature over anything else never verifies here
MAX_VALIDITY = timedelta(days=7)  # a store refuses an authorization meant to last longer


class RunSignatureError(ValueError):
    """A run config whose authorization does not hold; the message says why."""


@dataclass(frozen=True)
class Authorization:
    """What a verified signature vouches for besides the settings."""

    expires: datetime
    nonce: str
    fab_hash: str
    key_id: str


def _encode(key: str, value: Any) -> list:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return [key, "bool", value]
    if isinstance(value, int):
        return [key, "int", str(value)]
    if isinstance(value, float):
        return [key, "float", value.hex() if math.isfinite(value) else repr(value)]
    if isinstance(value, str):
        return [key, "str", value]
    raise RunSignatureError(f"run config '{key}' has a value of type {type(value).__name__}; "
                            "only bool, int, float and str can be signed")


def canonical(run_config: Mapping[str, Any]) -> bytes:
    """The bytes that are signed: every key but the signature, sorted, with exact types."""
    rows = [_encode(str(k), v) for k, v in sorted(run_config.items()) if k != SIGNATURE_KEY]
    return DOMAIN + json.dumps(rows, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def format_time(moment: datetime) -> str:
    """UTC, to the second, ``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        raise RunSignatureError(f"{EXPIRES_KEY} {text!r} is not a UTC time YYYY-MM-DDTHH:MM:SSZ") from None


def sign(run_config: Mapping[str, Any], private_key: Ed25519PrivateKey, *, expires: datetime, nonce: str,
         fab_hash: str) -> dict[str, str]:
    """The authorization keys to add to ``run_config`` (which must be the run config as the
    stores will see it: the app's defaults with the overrides on top)."""
    if len(nonce) < 16:
        raise RunSignatureError("a nonce needs at least 16 characters (use secrets.token_hex(16))")
    added = {EXPIRES_KEY: format_time(expires), NONCE_KEY: nonce, FAB_HASH_KEY: fab_hash,
             KEY_ID_KEY: key_id(private_key.public_key())}
    payload = canonical({**{k: v for k, v in run_config.items() if k not in AUTH_KEYS}, **added})
    added[SIGNATURE_KEY] = base64.b64encode(private_key.sign(payload)).decode("ascii")
    return added


def verify(run_config: Mapping[str, Any], public_key: Ed25519PublicKey, now: datetime) -> Authorization:
    """The authorization of ``run_config`` if its signature is the operator's and it has not
    expired at ``now``; else RunSignatureError naming the reason."""
    signature = run_config.get(SIGNATURE_KEY, "")
    if not isinstance(signature, str) or not signature:
        raise RunSignatureError("the run is not signed (no run-signature in its run config); "
                                "start runs with 'storefed train'")
    for key in (EXPIRES_KEY, NONCE_KEY, FAB_HASH_KEY, KEY_ID_KEY):
        if not isinstance(run_config.get(key), str) or not run_config.get(key):
            raise RunSignatureError(f"the run's signature comes without '{key}'")
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise RunSignatureError("run-signature is not base64") from None
    own = key_id(public_key)
    if run_config[KEY_ID_KEY] != own:
        raise RunSignatureError(f"the run is signed by key {run_config[KEY_ID_KEY]}, not by this chain's "
                                f"operator key {own}")
    try:
        public_key.verify(raw, canonical(run_config))
    except InvalidSignature:
        raise RunSignatureError("the run's signature does not match its run config (changed after signing, "
                                "or not signed by the operator)") from None
    expires = parse_time(run_config[EXPIRES_KEY])
    if not now < expires:
        raise RunSignatureError(f"the run's authorization expired at {format_time(expires)} "
                                f"(now {format_time(now)})")
    if expires - now > MAX_VALIDITY:
        raise RunSignatureError(f"the run's authorization lasts until {format_time(expires)}, longer than "
                                f"the {MAX_VALIDITY.days} days a store accepts")
    return Authorization(expires, run_config[NONCE_KEY], run_config[FAB_HASH_KEY], own)
