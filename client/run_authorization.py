"""A deployed store trains only for runs its chain's operator signed (issue 14, item 3).

Checked for every message, before the store reads any of its data:

* the store holds the operator's public key in its own node config
  (``operator-public-key = "/etc/storefed/operator.pub"``); a deployed store without one
  refuses every run (fail closed);
* the run config carries the operator's signature over every other key of it
  (common/privacy/run_signature.py), and the authorization had not expired when this
  store first saw the run;
* the run's nonce was never used by another run: nonces are recorded, with the run id
  they belong to, in ``run-nonces.json`` in the store's own state directory (node config
  ``state-dir``, else ``<store-dir>/state`` — never a directory the run config names),
  written atomically under a lock. One run sends many messages; a second run with the
  same nonce is a replay.

A simulated store (node config ``partition-id``, no ``store-dir``) is exempt: its data is
generated and its randomness public; a simulation demonstrates, it protects no one.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.state.file_lock import locked
from client.state.paths import own_state_dir
from common.data.storefiles import atomic_write_text
from common.privacy import run_signature
from common.privacy.run_signature import RunSignatureError

PUBLIC_KEY_CONFIG = "operator-public-key"
NONCE_FILE = "run-nonces.json"
KEEP_NONCES = timedelta(days=30)  # past their expiry: a replay of an older one fails its expiry anyway


class RunNotAuthorized(Exception):
    """The store refuses this run; the message is the reason (it goes to the server)."""


def is_simulated(node_config: Mapping[str, Any]) -> bool:
    return "store-dir" not in node_config and "partition-id" in node_config


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise RunNotAuthorized(f"{path}: cannot read the operator public key ({exc.strerror}); "
                               "this store refuses every run until node config operator-public-key names it") from None
    except ValueError:
        raise RunNotAuthorized(f"{path}: not a PEM public key (node config operator-public-key)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RunNotAuthorized(f"{path}: not an ed25519 public key (node config operator-public-key)")
    return key


def _locked(state: Path):
    return locked(Path(state) / f"{NONCE_FILE}.lock")


def _read_nonces(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        # Unreadable means unknown: treating it as empty would let every old run replay.
        raise RunNotAuthorized(f"{path}: unreadable ({exc}); this store refuses runs until it is repaired") from None
    if not isinstance(seen, dict):
        raise RunNotAuthorized(f"{path}: not a JSON object; this store refuses runs until it is repaired")
    return seen


def authorize(node_config: Mapping[str, Any], run_config: Mapping[str, Any], run_id: int | str,
              now: datetime | None = None) -> run_signature.Authorization | None:
    """Return the run's authorization, or None for a simulated store; raise
    RunNotAuthorized with the reason when this store must not take part in the run."""
    if is_simulated(node_config):
        return None
    now = now or datetime.now(timezone.utc)
    if not node_config.get(PUBLIC_KEY_CONFIG):
        raise RunNotAuthorized("this store has no operator public key (node config operator-public-key) "
                               "and refuses every run")
    public_key = load_public_key(Path(str(node_config[PUBLIC_KEY_CONFIG])))
    state = own_state_dir(node_config)
    if state is None:
        raise RunNotAuthorized("node config has no store-dir: this store cannot check runs and refuses them")
    nonces = state / NONCE_FILE
    run = str(run_id)
    with _locked(state):
        seen = _read_nonces(nonces)
        nonce = run_config.get(run_signature.NONCE_KEY)
        entry = seen.get(nonce) if isinstance(nonce, str) else None
        if entry is not None and not isinstance(entry, dict):
            raise RunNotAuthorized(f"{nonces}: malformed entries; this store refuses runs until it is repaired")
        # A run keeps its authorization for all its messages: expiry is judged when the
        # store first saw it.
        try:
            at = now
            if entry is not None and entry.get("run_id") == run:
                at = run_signature.parse_time(str(entry.get("first_seen")))
            auth = run_signature.verify(run_config, public_key, at)
            keep = {k: v for k, v in seen.items()
                    if run_signature.parse_time(str(v.get("expires"))) + KEEP_NONCES > now}
        except RunSignatureError as exc:
            raise RunNotAuthorized(str(exc)) from None
        except AttributeError:  # an entry that is not an object
            raise RunNotAuthorized(f"{nonces}: malformed entries; this store refuses runs until it is repaired") from None
        if entry is not None and entry.get("run_id") != run:
            raise RunNotAuthorized(f"replayed run: nonce {auth.nonce} was already used by run {entry.get('run_id')}, "
                                   f"this is run {run}")
        if entry is None:
            keep[auth.nonce] = {"run_id": run, "first_seen": run_signature.format_time(now),
                                "expires": run_signature.format_time(auth.expires)}
            atomic_write_text(nonces, json.dumps(keep, sort_keys=True, indent=1) + "\n")
    return auth
