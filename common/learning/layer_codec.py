"""The store-local layer as bytes (DESIGN §5.1, §5.2): what a store keeps next to its model.

The layer is a dataclass (:class:`common.learning.local_layer.LocalLayer`); it is written
field by field, so that a field added to it later is kept without a change here:

* numpy arrays → one ``.npy`` entry each of an ``.npz`` archive (no pickle: ``allow_pickle``
  stays off both ways);
* scipy sparse matrices → their CSR parts (``data``, ``indices``, ``indptr``) and shape;
* ``None``, numbers, strings, lists and dicts of those → the archive's JSON description,
  together with the caller's ``meta`` (the model hash the layer was fitted on, …).

A file written by another version of the layer (a field missing or unknown), a damaged
file, or one with a non-finite number is refused with :class:`LayerFileError`: the store
then fits a new layer rather than serving from a wrong one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile

import numpy as np
from scipy import sparse

from common.learning.local_layer import LocalLayer

FORMAT = 1
_META = "meta.json"


class LayerFileError(Exception):
    """Bytes that are not a usable store-local layer; the message says why."""


def encode_layer(layer: LocalLayer, meta: dict) -> bytes:
    """The layer and a JSON-able ``meta`` as the bytes of one ``.npz`` archive."""
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, object] = {}
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, np.ndarray):
            arrays[f"a.{f.name}"] = value
        elif sparse.issparse(value):
            csr = sparse.csr_matrix(value)
            arrays[f"s.{f.name}.data"] = csr.data
            arrays[f"s.{f.name}.indices"] = csr.indices
            arrays[f"s.{f.name}.indptr"] = csr.indptr
            arrays[f"s.{f.name}.shape"] = np.asarray(csr.shape, dtype=np.int64)
        else:
            plain[f.name] = _plain(value, f.name)
    description = {"format": FORMAT, "meta": meta, "fields": plain,
                   "arrays": sorted({k.split(".")[1] for k in arrays})}
    arrays[_META] = np.frombuffer(json.dumps(description, allow_nan=False).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_layer(data: bytes) -> tuple[LocalLayer, dict]:
    """(layer, meta) from :func:`encode_layer`'s bytes; :class:`LayerFileError` when unusable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            entries = {name: archive[name] for name in archive.files}
        description = json.loads(entries.pop(_META).tobytes().decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise LayerFileError(f"not a store-local layer file ({exc.__class__.__name__})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise LayerFileError(f"unknown layer file format {description.get('format') if isinstance(description, dict) else None!r}")
    values: dict[str, object] = dict(description.get("fields") or {})
    for name in description.get("arrays") or []:
        if f"a.{name}" in entries:
            values[name] = entries[f"a.{name}"]
        else:
            try:
                shape = tuple(int(n) for n in entries[f"s.{name}.shape"])
                values[name] = sparse.csr_matrix((entries[f"s.{name}.data"], entries[f"s.{name}.indices"],
                                                  entries[f"s.{name}.indptr"]), shape=shape)
            except (KeyError, ValueError, TypeError) as exc:
                raise LayerFileError(f"field '{name}' is damaged ({exc.__class__.__name__})") from None
    known = {f.name for f in dataclasses.fields(LocalLayer)}
    if set(values) != known:
        missing, unknown = sorted(known - set(values)), sorted(set(values) - known)
        raise LayerFileError(f"written by another version of the layer (missing {missing}, unknown {unknown})")
    for name, value in values.items():
        if not _finite(value):
            raise LayerFileError(f"field '{name}' holds a non-finite number")
    meta = description.get("meta")
    return LocalLayer(**values), meta if isinstance(meta, dict) else {}


def _plain(value, name: str):
    """A JSON value for a field that is not an array (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, name) for k, v in value.items()}
    raise TypeError(f"local layer field '{name}' of type {type(value).__name__} cannot be written")


def _finite(value) -> bool:
    if isinstance(value, np.ndarray):
        return not np.issubdtype(value.dtype, np.number) or bool(np.isfinite(value).all())
    if sparse.issparse(value):
        return bool(np.isfinite(value.data).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True
