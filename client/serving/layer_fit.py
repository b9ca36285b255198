"""The store-local layer at a store (DESIGN §5.1): fitted here, on this store's data, kept here.

The math is :mod:`common.learning.local_layer`; this module fits it on the global model a
store receives and keeps one layer per store and process (the last model's). Nothing of it
is sent: the train handler never calls this module, and the evaluation reply carries only
the aggregate list metrics of the served model (listed in :mod:`common.exchange.wire`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from common.data.dataset import StoreData
from common.learning.local_layer import LocalConfig, LocalLayer, adapt
from common.learning.model import Recommender

_CACHE: dict[str, tuple[str, LocalLayer]] = {}


def model_digest(model: Recommender) -> str:
    """A fingerprint of the model's weights: a new global model means a new layer."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(value.detach().numpy()).tobytes())
    return h.hexdigest()


def layer_for(store_key: str, model: Recommender, data: StoreData, cfg: LocalConfig = LocalConfig()) -> LocalLayer:
    """This store's layer on ``model``: fitted once per (store, model) and process."""
    digest = model_digest(model)
    cached = _CACHE.get(store_key)
    if cached is None or cached[0] != digest:
        _CACHE[store_key] = (digest, adapt(model, data, cfg))
    return _CACHE[store_key][1]
