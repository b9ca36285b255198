"""The global model as bytes: its content hash and the checks a store runs on it. Pure.

A model that reaches a store is untrusted input (DESIGN §1): it is decoded with
``torch.load(weights_only=True)`` (tensors only, no code), must hold exactly the tensors a
:class:`~common.learning.model.Recommender` over the store's catalog has, with the same
shapes, and only finite values.

The content hash is SHA-256 over the canonical weights: for every tensor in name order, its
name, dtype, shape and little-endian float32 bytes. The same weights give the same hash
whatever file or message carried them, so a store can tell the server's ``model.pt`` apart
from any other.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from common.exchange.packing import PACKED_PREFIX


class ModelFileError(ValueError):
    """Weights that cannot be used with this store's catalog; the message says why."""


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


def weights_digest(state: Mapping[str, object]) -> str:
    """SHA-256 (hex) of the canonical bytes of ``state`` (name → tensor or array)."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = _as_array(state[name])
        h.update(f"{name}|float32|{','.join(map(str, arr.shape))}|".encode())
        h.update(arr.astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def encode_weights(state: Mapping[str, object]) -> bytes:
    """``state`` as the bytes of a ``torch.save`` file (float32 CPU tensors)."""
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(_as_array(v).copy()) for k, v in state.items()}, buf)
    return buf.getvalue()


def check_weights(state: Mapping[str, object], expected: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """``state`` as float32 tensors when it has exactly the ``expected`` names and shapes
    and only finite values; else :class:`ModelFileError` naming the first problem."""
    if not isinstance(state, Mapping):
        raise ModelFileError("the model file does not hold a name → tensor mapping")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelFileError(f"the model's tensors do not match this store's model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); it was trained for another catalog or version")
    out = {}
    for name, shape in expected.items():
        value = state[name]
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise ModelFileError(f"tensor '{name}' is not an array")
        if value.dtype not in (torch.float32, np.float32):
            raise ModelFileError(f"tensor '{name}' is {value.dtype}; a store takes float32 weights only")
        arr = _as_array(value)
        if tuple(arr.shape) != tuple(shape):
            raise ModelFileError(f"tensor '{name}' has shape {tuple(arr.shape)}, the store's catalog needs "
                                 f"{tuple(shape)}; the model was trained for another catalog")
        if not np.isfinite(arr).all():
            raise ModelFileError(f"tensor '{name}' holds NaN or infinite values")
        out[name] = torch.from_numpy(arr.copy())
    return out


# The largest global model a store accepts in one message, in bytes of array data: 4 M items
# × d 64 in float32 is 1 GiB. A model beyond it is refused before any array is decoded.
MAX_MODEL_BYTES = 1 << 30
# What a NumPy ``.npy`` header may add to an array's data bytes (Flower sends arrays so).
_NPY_HEADER_MAX = 4096


@dataclass(frozen=True)
class ArraySpec:
    """What a message says about one array, read without decoding it."""

    dtype: str
    shape: tuple
    nbytes: int  # length of its serialised data


def check_array_specs(specs: Mapping[str, ArraySpec], expected: Mapping[str, tuple | None],
                      max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Refuse (:class:`ModelFileError`) arrays that are not exactly the model's, from what
    the message *says* of them: names, dtype float32, shapes, data lengths and their total.

    Runs before any array is decoded, so a foreign array (an int8 table under a weight's
    name, a huge shape) costs no memory: only the expected float32 bytes are ever decoded.
    The decision reads the message and the catalog's shapes only, never member data. A
    shape of None in ``expected`` is not known yet (the catalog not read): not checked.
    """
    total = sum(max(0, int(s.nbytes)) for s in specs.values())
    if total > max_bytes:
        raise ModelFileError(f"the model's arrays hold {total:,} bytes, more than a store accepts "
                             f"({max_bytes:,})")
    missing = sorted(set(expected) - set(specs))
    extra = sorted(set(specs) - set(expected))
    if missing or extra:
        raise ModelFileError(f"the model's tensors do not match this store's model (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); it was trained for another catalog or version")
    for name, shape in expected.items():
        spec = specs[name]
        if spec.dtype != "float32":
            raise ModelFileError(f"tensor '{name}' is {spec.dtype!r}; a store takes float32 weights only")
        if shape is None:
            continue
        if tuple(spec.shape) != tuple(shape):
            raise ModelFileError(f"tensor '{name}' has shape {tuple(spec.shape)}, the store's catalog needs "
                                 f"{tuple(shape)}; the model was trained for another catalog")
        want = 4 * math.prod(shape)
        if not want <= spec.nbytes <= want + _NPY_HEADER_MAX:
            raise ModelFileError(f"tensor '{name}' carries {spec.nbytes:,} bytes of data for {want:,} bytes "
                                 "of float32 weights")


def check_packed_spec(specs: Mapping[str, ArraySpec], n_values: int | None,
                      max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Refuse (:class:`ModelFileError`) a packed model (common.exchange.packing) that is not
    one 1-D float32 array named ``packed:float32`` of ``n_values`` values, from what the
    message says of it, before it is decoded. ``n_values`` None: the catalog not read yet."""
    name = PACKED_PREFIX + "float32"
    if set(specs) != {name}:
        raise ModelFileError(f"a packed model is one array '{name}'; this message carries {sorted(specs)[:3]}")
    spec = specs[name]
    if spec.dtype != "float32" or len(spec.shape) != 1:
        raise ModelFileError(f"'{name}' is {spec.dtype!r} of shape {tuple(spec.shape)}; a store takes a 1-D "
                             "float32 array only")
    if not 0 <= spec.nbytes <= max_bytes + _NPY_HEADER_MAX:
        raise ModelFileError(f"the model's arrays hold {spec.nbytes:,} bytes, more than a store accepts ({max_bytes:,})")
    if n_values is None:
        return
    if tuple(spec.shape) != (n_values,) or not 4 * n_values <= spec.nbytes <= 4 * n_values + _NPY_HEADER_MAX:
        raise ModelFileError(f"'{name}' holds {spec.shape[0]:,} values in {spec.nbytes:,} bytes; the store's "
                             f"catalog needs {n_values:,} float32 values; the model was trained for another catalog")


def decode_weights(data: bytes, expected: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """Checked weights from the bytes of a model file (see :func:`check_weights`)."""
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise ModelFileError(f"not a readable weights file ({exc.__class__.__name__})") from None
    return check_weights(state, expected)
