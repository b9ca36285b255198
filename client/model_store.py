"""The global model a store keeps for serving (DESIGN §5.2): current and previous.

Under the store's state directory:

* ``model.pt`` — the weights (a ``torch.save`` file of tensors only);
* ``model.json`` — ``{"run_id", "round", "hash", "epsilon", "final", "received_at"}``, where
  ``hash`` is :func:`common.learning.weights.weights_digest` of the weights and ``epsilon`` the
  store's ε spent when the model arrived;
* ``model.prev.pt`` / ``model.prev.json`` — the model before it, for a rollback
  (``mv model.prev.pt model.pt; mv model.prev.json model.json``).

Each file is written atomically; the weights go first and the description last, and a
reader checks the weights' hash against the description, so a reader that comes between the
two writes sees a mismatch and keeps the model it has (see :func:`read_model`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from common.data.storefiles import atomic_write_bytes, atomic_write_text
from common.learning.weights import ModelFileError, decode_weights, encode_weights, weights_digest

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
PREV_MODEL_FILE = "model.prev.pt"
PREV_INFO_FILE = "model.prev.json"


def read_info(state_dir: Path) -> dict | None:
    """The description of the store's current model, or None when it has none (or it is damaged)."""
    try:
        info = json.loads((Path(state_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("hash"), str) else None


def keep_model(state_dir: Path, weights: Mapping[str, object], *, run_id: str, server_round: int,
               epsilon: float | None, final: bool) -> dict:
    """Make ``weights`` the store's current model (the current one becomes the previous).

    Returns the new description. Nothing is rewritten when the store already holds these
    exact weights (a repeated delivery), except that a final delivery marks them final.
    """
    state_dir = Path(state_dir)
    digest = weights_digest(weights)
    current = read_info(state_dir)
    info = {"run_id": str(run_id), "round": int(server_round), "hash": digest,
            "epsilon": None if epsilon is None else float(epsilon), "final": bool(final),
            "received_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if current is not None and current["hash"] == digest:
        if final and not current.get("final"):
            atomic_write_text(state_dir / INFO_FILE, json.dumps({**current, "final": True}, indent=2) + "\n")
        return read_info(state_dir) or info
    if current is not None and (state_dir / MODEL_FILE).exists():
        atomic_write_bytes(state_dir / PREV_MODEL_FILE, (state_dir / MODEL_FILE).read_bytes())
        atomic_write_text(state_dir / PREV_INFO_FILE, json.dumps(current, indent=2) + "\n")
    atomic_write_bytes(state_dir / MODEL_FILE, encode_weights(weights))
    atomic_write_text(state_dir / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info


def read_model(state_dir: Path, expected: Mapping[str, tuple]) -> tuple[dict, dict]:
    """(checked weights, description) of the store's current model.

    Raises :class:`ModelFileError` when there is none, when it does not fit the catalog, or
    when the weights do not match the description's hash (a delivery half-way through).
    """
    state_dir = Path(state_dir)
    info = read_info(state_dir)
    if info is None:
        raise ModelFileError(f"{state_dir / INFO_FILE}: no model delivered to this store yet")
    try:
        data = (state_dir / MODEL_FILE).read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{state_dir / MODEL_FILE}: cannot be read ({exc.strerror})") from None
    weights = decode_weights(data, expected)
    if weights_digest(weights) != info["hash"]:
        raise ModelFileError(f"{state_dir / MODEL_FILE}: its hash differs from {INFO_FILE} (a delivery in "
                             "progress, or a file changed by hand)")
    return weights, info
