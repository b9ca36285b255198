"""The store-local layer a store keeps for serving (DESIGN §5.1, §5.2), next to its model.

Under the store's state directory (:mod:`client.state.model_store`):

* ``local_layer.npz`` — the layer (:mod:`common.learning.layer_codec`), with the hash of the
  model it was fitted on (``model.json``'s ``hash``), when and by whom it was fitted;
* ``local_layer.prev.npz`` — the one before it, so that a rolled-back model finds its layer.

A layer is used only with the model whose hash it names: a layer fitted on another model
is never mixed with a newer one, and a store without a matching layer serves the global
model alone until one is fitted. Nothing here is sent: the layer is the store's own.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.data.dataset import StoreData
from common.data.storefiles import atomic_write_bytes
from common.learning.layer_codec import LayerFileError, decode_layer, encode_layer
from common.learning.local_layer import LocalConfig, LocalLayer, adapt
from common.learning.model import Recommender

LAYER_FILE = "local_layer.npz"
PREV_LAYER_FILE = "local_layer.prev.npz"


def read_layer(state_dir: Path, model_hash: str) -> tuple[LocalLayer, dict] | None:
    """(layer, meta) fitted on the model of ``model_hash``, from the current or previous
    file; None when neither matches (or both are damaged: they are then fitted again)."""
    for name in (LAYER_FILE, PREV_LAYER_FILE):
        path = Path(state_dir) / name
        try:
            layer, meta = decode_layer(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, LayerFileError) as exc:
            print(f"storefed: {path}: not used ({exc}); the layer is fitted again", file=sys.stderr, flush=True)
            continue
        if meta.get("model_hash") == model_hash:
            return layer, meta
    return None


def keep_layer(state_dir: Path, layer: LocalLayer, model_hash: str, fitted_by: str) -> dict:
    """Write ``layer`` (fitted on the model of ``model_hash``) as the store's current layer;
    the current one becomes the previous. Returns the meta written."""
    state_dir = Path(state_dir)
    meta = {"model_hash": str(model_hash), "fitted_by": fitted_by, "fitted_on": int(getattr(layer, "fitted_on", 0)),
            "fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    data = encode_layer(layer, meta)
    current = state_dir / LAYER_FILE
    if current.exists():
        try:
            old_bytes = current.read_bytes()
            old = decode_layer(old_bytes)[1]
        except (OSError, LayerFileError):
            old = None
        if old is not None and old.get("model_hash") != model_hash:
            atomic_write_bytes(state_dir / PREV_LAYER_FILE, old_bytes)
    atomic_write_bytes(current, data)
    return meta


Found = tuple[LocalLayer, dict]  # a layer and its file's description


def obtain(state_dir: Path, model_hash: str, fit: Callable[[], LocalLayer] | None, fitted_by: str,
           usable: Callable[[LocalLayer], bool] = lambda layer: True) -> tuple[Found | None, str | None]:
    """The layer of the model ``model_hash`` and why it is not (or not kept): the one kept
    for it when ``usable``; else ``fit()`` (None: do not fit), kept for it.

    ((layer, meta), None) · ((layer, meta), why it could not be kept: it is used all the
    same and fitted again later) · (None, why it could not be fitted) · (None, None)."""
    found = read_layer(state_dir, model_hash)
    if found is not None and usable(found[0]):
        return found, None
    if fit is None:
        return None, None
    try:
        layer = fit()
    except Exception as exc:  # a store too small or too new to split: the global model alone
        return None, f"no store-local layer: {exc.__class__.__name__}: {exc}"
    try:
        return (layer, keep_layer(state_dir, layer, model_hash, fitted_by)), None
    except Exception as exc:  # e.g. a read-only state directory: the layer is still used
        meta = {"model_hash": model_hash, "fitted_by": fitted_by, "fitted_on": int(getattr(layer, "fitted_on", 0))}
        return (layer, meta), f"the layer is used but could not be kept: {exc}"


def keep_for_delivery(state_dir: Path, model_hash: str, fit: Callable[[], LocalLayer]) -> dict | None:
    """At a model's delivery: the layer ``fit()`` returns, kept for ``model_hash`` unless the
    store already holds one for it. Returns its meta; None when it could not be fitted or
    written: the model is kept all the same and `storefed serve` fits the layer itself."""
    found, problem = obtain(state_dir, model_hash, fit, "delivery")
    if problem is not None:  # the model matters more than its layer: say why, and go on
        print(f"storefed: {state_dir}: no store-local layer kept with model {model_hash[:12]} "
              f"({problem}); storefed serve will fit it", file=sys.stderr, flush=True)
        return None
    return found[1]


_CACHE: dict[str, tuple[str, LocalLayer]] = {}


def model_digest(model: Recommender) -> str:
    """A fingerprint of the model's weights: a new global model means a new layer."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value.detach().numpy()).tobytes())
    return h.hexdigest()


def layer_for(store_key: str, model: Recommender, data: StoreData, cfg: LocalConfig = LocalConfig()) -> LocalLayer:
    """This store's layer on ``model``, fitted once per (store, model) and process (the
    ClientApp's: the last model's layer, in memory)."""
    digest = model_digest(model)
    cached = _CACHE.get(store_key)
    if cached is None or cached[0] != digest:
        _CACHE[store_key] = (digest, adapt(model, data, cfg))
    return _CACHE[store_key][1]
