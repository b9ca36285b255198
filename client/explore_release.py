"""The store's one DP release for the explore prior (DESIGN §5.3, §4.3). Pure: numpy, no files.

Once per run, before the first round, a store may release the sum over its training members
of one vector per member, plus Gaussian noise:

* **item part** (``n_items`` values): the member's distinct items bought in the training
  period as a 0/1 vector, scaled to L2 norm 1/√2;
* **category part** (``n_categories²`` values): the outer product ``c cᵀ`` of the member's
  category counts ``c`` scaled to unit norm (so ``‖c cᵀ‖_F = 1``), scaled by 1/√2.

Each member's vector has L2 norm exactly 1 (at most 1: a member without lines adds 0), so
adding or removing one member moves the sum by at most 1: the Gaussian mechanism with
sensitivity 1, and noise ``N(0, σ²)`` per value is one ``(σ, q = 1, 1 step)`` entry of the
store's ledger, composed with its DP-SGD rounds by the same accountant. The category part is
what the issue calls a category-level co-occurrence: at these store sizes item-level
co-occurrence would be noise, while 40 × 40 values summed over a chain carry signal.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from common.data.dataset import ItemIndex, MemberLog

_HALF = 1.0 / math.sqrt(2.0)


def release_length(items: ItemIndex) -> int:
    """Values in one release: the item part, then the category part (row-major)."""
    return items.n_items + items.n_categories * items.n_categories


def member_sum(log: MemberLog, items: ItemIndex, item_weight: float = _HALF, cap: int = 0) -> np.ndarray:
    """The exact sum over the log's members of their unit-norm vectors (never sent as is).

    ``item_weight`` is the item part's norm (the category part's is √(1 − item_weight²));
    ``cap`` > 0 keeps only a member's ``cap`` most bought items (ties: lower index) in the
    item part. Both are candidates of the design report; the defaults are the design."""
    if not (math.isfinite(item_weight) and 0.0 <= item_weight <= 1.0):
        raise ValueError(f"item_weight must be in [0, 1] (the vector's norm is 1), not {item_weight!r}")
    n_items, n_cat = items.n_items, items.n_categories
    # The default split is exactly the design's 1/√2 on both parts.
    cat_weight = _HALF if item_weight == _HALF else math.sqrt(1.0 - item_weight * item_weight)
    total = np.zeros(release_length(items), dtype=np.float64)
    cat_part = total[n_items:].reshape(n_cat, n_cat)  # a view: filled in place
    for m in range(len(log.receipt_ptr) - 1):
        lo, hi = log.line_ptr[log.receipt_ptr[m]], log.line_ptr[log.receipt_ptr[m + 1]]
        bought, times = np.unique(log.line_item[lo:hi], return_counts=True)
        if len(bought) == 0:
            continue
        kept = bought[np.argsort(-times, kind="stable")[:cap]] if 0 < cap < len(bought) else bought
        total[kept] += item_weight / math.sqrt(len(kept))
        counts = np.bincount(items.category[bought], minlength=n_cat).astype(np.float64)
        counts /= np.linalg.norm(counts)
        cat_part += cat_weight * np.outer(counts, counts)
    return total


def noised_release(log: MemberLog, items: ItemIndex, sigma: float,
                   gaussian: Callable[[int, float], np.ndarray]) -> np.ndarray:
    """The released vector: :func:`member_sum` plus ``gaussian(n, σ)`` (a deployed store passes
    its secure stream, :meth:`common.privacy.secure_noise.SecureRandom.gaussian`)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError("the release needs a finite noise multiplier > 0")
    exact = member_sum(log, items)
    return exact + np.asarray(gaussian(len(exact), sigma), dtype=np.float64)
