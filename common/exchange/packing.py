"""A model's tensors as one flat array per dtype on the wire: few Fleet objects per message.

Flower 1.41 moves a message as a tree of objects — the message, its records, and one
object per array and per array chunk — and a store pulls or pushes each object with its
own HTTP request. With the model's 17 tensors a train message is 38 objects, its reply 39,
so one store-round costs the SuperLink about 80 requests; that, not bytes, is what limits
how many stores one SuperLink serves (simulations/results/deploy-scale/report.md). Packed,
the same tensors are one array per dtype (``packed:float32``; an int8 update adds
``packed:int8``), and a store-round is a handful of objects.

What is packed is exactly what was sent before, bit for bit, in a fixed order: the names
sorted. The layout — names, shapes and dtypes — is never on the wire: each side derives it
from the model it already holds (the server from the global model it sent, a store from
its own catalog), so a receiver reads nothing but a length it checks exactly. Privacy:
a lossless re-arrangement of the same values; nothing is added and the ledger is unchanged.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PACKED_PREFIX = "packed:"
# (name, dtype, shape) of each tensor, in packing order.
Layout = Sequence[tuple[str, str, tuple[int, ...]]]


class PackingError(ValueError):
    """Packed arrays that do not fit the layout the receiver expects."""


def is_packed(names: Sequence[str] | Mapping[str, object]) -> bool:
    """Whether an array record's names are a packed model (every name ``packed:<dtype>``)."""
    names = list(names)
    return bool(names) and all(str(n).startswith(PACKED_PREFIX) for n in names)


def layout_of(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str] | str = "float32") -> list[tuple[str, str, tuple[int, ...]]]:
    """The packing order of tensors named in ``shapes``: sorted names, each with its dtype
    (one for all, or per name) and shape."""
    def dtype(name: str) -> str:
        return dtypes if isinstance(dtypes, str) else str(dtypes[name])
    return [(name, np.dtype(dtype(name)).name, tuple(int(d) for d in shapes[name])) for name in sorted(shapes)]


def layout_of_arrays(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The layout of the arrays themselves (a sender's view of what it packs)."""
    return layout_of({k: np.shape(v) for k, v in arrays.items()}, {k: np.asarray(v).dtype.name for k, v in arrays.items()})


def pack(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"packed:<dtype>": 1-D array}``: every array of that dtype, flattened, in sorted-name order."""
    groups: dict[str, list[np.ndarray]] = {}
    for name, dtype, _ in layout_of_arrays(arrays):
        groups.setdefault(dtype, []).append(np.ascontiguousarray(arrays[name]).reshape(-1))
    return {PACKED_PREFIX + dtype: np.concatenate(parts) for dtype, parts in sorted(groups.items())}


def unpack(packed: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The named tensors of ``layout`` cut from ``packed``. Raises :class:`PackingError`
    unless ``packed`` holds exactly one 1-D array per dtype of the layout, of exactly the
    layout's length and dtype."""
    need: dict[str, int] = {}
    for _, dtype, shape in layout:
        need[dtype] = need.get(dtype, 0) + math.prod(shape)
    expected = {PACKED_PREFIX + dtype for dtype in need}
    if set(packed) != expected:
        raise PackingError(f"packed arrays {sorted(packed)[:3]} do not match the model's {sorted(expected)}")
    for dtype, count in need.items():
        flat = packed[PACKED_PREFIX + dtype]
        if flat.dtype.name != dtype or flat.ndim != 1 or flat.size != count:
            raise PackingError(f"'{PACKED_PREFIX}{dtype}' is {flat.dtype.name}{list(flat.shape)}; "
                               f"the model needs {dtype}[{count}]")
    out: dict[str, np.ndarray] = {}
    offset = dict.fromkeys(need, 0)
    for name, dtype, shape in layout:
        n, start = math.prod(shape), offset[dtype]
        out[name] = packed[PACKED_PREFIX + dtype][start:start + n].reshape(shape).copy()
        offset[dtype] = start + n
    return out
