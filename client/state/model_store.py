"""The global model a store keeps for serving (DESIGN §5.2): current and previous.

Under the store's state directory:

* ``model.pt`` — the weights (a ``torch.save`` file of tensors only);
* ``model.json`` — ``{"run_id", "round", "hash", "epsilon", "final", "received_at",
  "delivered_in_run"}``, where ``hash`` is :func:`common.learning.weights.weights_digest` of
  the weights, ``epsilon`` the store's ε spent when the model arrived and
  ``delivered_in_run`` the Flower run (as the store's node saw it) that delivered it;
* ``model.prev.pt`` / ``model.prev.json`` — the last model of an *earlier* run, for a rollback
  (``mv model.prev.pt model.pt; mv model.prev.json model.json``).

A run places at most one final model: a second final delivery of other weights in the same
run is refused (:func:`check_delivery`), so a server cannot rotate the store's real previous
model away, nor make the store refit its local layer on member data over and over.

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


def _delivered_in(info: Mapping) -> str:
    """The run that delivered a kept model (older descriptions name only ``run_id``)."""
    return str(info.get("delivered_in_run", info.get("run_id", "")))


def check_delivery(state_dir: Path, digest: str, run: str) -> None:
    """Refuse (:class:`ModelFileError`) a final delivery of weights ``digest`` in ``run``
    when that run has already placed another final model at this store."""
    current = read_info(Path(state_dir))
    if current is not None and current.get("final") and _delivered_in(current) == str(run) \
            and current["hash"] != digest:
        raise ModelFileError(f"run {run} already delivered its final model ({current['hash'][:12]}) to this "
                             "store; a run delivers one, and the store keeps it")


def keep_model(state_dir: Path, weights: Mapping[str, object], *, run_id: str, server_round: int,
               epsilon: float | None, final: bool, delivered_in_run: str | None = None) -> dict:
    """Make ``weights`` the store's current model; the current one becomes the previous
    when an earlier run delivered it (within one run, the newer model replaces it).

    Returns the new description. Nothing is rewritten when the store already holds these
    exact weights (a repeated delivery), except that a final delivery marks them final.
    Raises ModelFileError for a second final model in one run (:func:`check_delivery`).
    """
    state_dir = Path(state_dir)
    run = str(run_id if delivered_in_run is None else delivered_in_run)
    digest = weights_digest(weights)
    if final:
        check_delivery(state_dir, digest, run)
    current = read_info(state_dir)
    info = {"run_id": str(run_id), "round": int(server_round), "hash": digest,
            "epsilon": None if epsilon is None else float(epsilon), "final": bool(final),
            "received_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "delivered_in_run": run}
    if current is not None and current["hash"] == digest:
        if final and not current.get("final"):
            atomic_write_text(state_dir / INFO_FILE, json.dumps({**current, "final": True}, indent=2) + "\n")
        return read_info(state_dir) or info
    if current is not None and _delivered_in(current) != run and (state_dir / MODEL_FILE).exists():
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
