"""Server checkpoints: everything needed to continue a run exactly where it stopped.

One file, ``<checkpoint-dir>/checkpoint.pt``, rewritten atomically after every round (temp
file, fsync, rename, fsync of the directory): the global model, the strategy's server-side
state (FedAdam/FedYogi moments, FedAvgM momentum), the round, the run config, the run's
name (the stores derive their per-round seeds from it in simulation) and the report so far.

A checkpoint is a pickle: load only checkpoints this server wrote.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from common.data.storefiles import atomic_write_bytes
from common.privacy.run_signature import AUTH_KEYS

FORMAT = "storefed-checkpoint"
VERSION = 1
FILE = "checkpoint.pt"
# Keys that may differ between an interrupted run and its resumption.
VOLATILE_KEYS = frozenset({"resume", "out-dir", "checkpoint-dir", "stop-after-round", "node-wait-s",
                           "round-timeout-s", "fraction-evaluate",
                           # a resumed run is a new run: its own signature, expiry and nonce
                           *AUTH_KEYS})


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or from a different run configuration."""


def save_checkpoint(directory: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (round, arrays, strategy state, config, …) atomically."""
    buf = io.BytesIO()
    pickle.dump({"format": FORMAT, "version": VERSION, **payload}, buf, protocol=pickle.HIGHEST_PROTOCOL)
    path = Path(directory) / FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint in ``directory``, checked against the run ``config``."""
    path = Path(directory) / FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume first")
    try:
        payload = pickle.loads(path.read_bytes())
    except Exception as exc:  # a truncated pickle raises any of several errors
        raise CheckpointError(f"{path}: damaged or truncated ({exc.__class__.__name__}); it cannot be "
                              "resumed — restore it or start a new run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a storefed checkpoint of version {VERSION}")
    saved = payload.get("config", {})
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in VOLATILE_KEYS and saved.get(k) != config.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in differ[:5])
        raise CheckpointError(f"{path}: written by a run with other settings ({details}); resume with the "
                              "same settings or start a new run")
    return payload
