"""What a store's train reply carries: the model, or a compressed update (``update-encoding``).

* ``float32``: the weights after local DP-SGD, as they are (the default).
* ``float16``: the update ``w_local − w_global`` in half precision (½ the bytes).
* ``int8``: the update quantised per row (per tensor for vectors) to int8 with an absmax
  scale, by unbiased stochastic rounding; the scales travel as ``<name>.scale`` (≈¼ the bytes).

Privacy: every encoding is a function of the DP-SGD output and of the global model (public)
only, plus rounding randomness independent of the data — post-processing, so the ledger's
(ε, δ) holds unchanged. Nothing here selects rows by what members bought: every row of
every table is sent, always.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from common.exchange import packing

ENCODINGS = ("float32", "float16", "int8")
SCALE_SUFFIX = ".scale"
Arrays = Mapping[str, np.ndarray]
_F16_MAX = float(np.finfo(np.float16).max)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)


def encoded_layout(reference: Arrays, encoding: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """What :func:`encode` returns for a model shaped like ``reference``, as a packing
    layout (common.exchange.packing): each name with its dtype and shape."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown update encoding '{encoding}'; use one of {', '.join(ENCODINGS)}")
    shapes = {k: tuple(np.shape(v)) for k, v in reference.items()}
    if encoding == "float32":
        return packing.layout_of(shapes, {k: np.asarray(v).dtype.name for k, v in reference.items()})
    if encoding == "float16":
        return packing.layout_of(shapes, "float16")
    dtypes = dict.fromkeys(shapes, "int8")
    for name, shape in list(shapes.items()):
        shapes[name + SCALE_SUFFIX] = (shape[0] if len(shape) >= 2 else 1,)
        dtypes[name + SCALE_SUFFIX] = "float32"
    return packing.layout_of(shapes, dtypes)


def encode(weights: Arrays, reference: Arrays, encoding: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The arrays to send for trained ``weights``, given the round's global ``reference``."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown update encoding '{encoding}'; use one of {', '.join(ENCODINGS)}")
    if encoding == "float32":
        return {k: np.asarray(v) for k, v in weights.items()}
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        delta = np.asarray(w, dtype=np.float32) - np.asarray(reference[name], dtype=np.float32)
        if encoding == "float16":
            # Clipped to half precision's range: a step beyond ±65504 would become ±inf on the wire.
            out[name] = np.clip(delta, -_F16_MAX, _F16_MAX).astype(np.float16)
            continue
        rows = _rows(delta)
        scale = np.abs(rows).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        x = rows / scale[:, None]
        # Stochastic rounding: E[q] = x, so the server's average stays unbiased.
        q = np.floor(x + rng.random(x.shape, dtype=np.float32))
        out[name] = np.clip(q, -127, 127).astype(np.int8).reshape(delta.shape)
        out[name + SCALE_SUFFIX] = scale.astype(np.float32)
    return out


def decode(arrays: Arrays, reference: Arrays, encoding: str) -> dict[str, np.ndarray]:
    """The store's weights from what it sent; raises ``ValueError`` when ``arrays`` is not a
    well-formed ``encoding`` of a model shaped like ``reference``."""
    if encoding == "float32":
        return dict(arrays)
    expected = set(reference) | ({k + SCALE_SUFFIX for k in reference} if encoding == "int8" else set())
    if set(arrays) != expected:
        raise ValueError("array names do not match the model")
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        got = np.asarray(arrays[name])
        if got.shape != ref.shape:
            raise ValueError(f"'{name}' has shape {got.shape}, expected {ref.shape}")
        if encoding == "float16":
            if got.dtype != np.float16:
                raise ValueError(f"'{name}' is {got.dtype}, expected float16")
            delta = got.astype(np.float32)
        else:
            scale = np.asarray(arrays[name + SCALE_SUFFIX], dtype=np.float32)
            if got.dtype != np.int8 or scale.shape != (_rows(ref).shape[0],):
                raise ValueError(f"'{name}' is not an int8 array with one scale per row")
            delta = (_rows(got).astype(np.float32) * scale[:, None]).reshape(ref.shape)
        out[name] = (ref.astype(np.float32) + delta).astype(ref.dtype)
    return out
