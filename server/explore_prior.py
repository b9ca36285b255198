"""The chain's explore prior from the stores' DP releases (DESIGN §5.3). Pure: numpy.

The server sums the stores' noised vectors (:mod:`client.explore_release`) and turns the sum
into the model's two prior arrays. Everything here is post-processing of DP outputs: it
costs no ε, whatever it does.

* ``prior_item[i] = log(1 + max(0, pop_i))``: smoothed log-popularity (a member with k items
  adds 1/√(2k) to each), so an item sold anywhere in the chain ranks by the chain's demand;
* ``prior_cat[c, c'] = log P(c' | c)`` from the symmetric co-occurrence, negative noise cut
  at 0 and each row smoothed by ``smoothing`` pseudo-counts per cell before normalising.
"""

from __future__ import annotations

import numpy as np


def summed(releases: list[np.ndarray], length: int) -> np.ndarray:
    """The sum of the stores' releases; each must be finite and ``length`` long (ValueError)."""
    total = np.zeros(length, dtype=np.float64)
    for r in releases:
        r = np.asarray(r, dtype=np.float64)
        if r.shape != (length,) or not np.isfinite(r).all():
            raise ValueError(f"a release must be {length} finite values")
        total += r
    return total


def prior_arrays(total: np.ndarray, n_items: int, n_categories: int,
                 smoothing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(prior_item [n_items], prior_cat [n_categories, n_categories]) from the summed release."""
    pop = np.maximum(total[:n_items], 0.0)
    prior_item = np.log1p(pop)
    co = np.maximum(total[n_items:].reshape(n_categories, n_categories), 0.0)
    co = 0.5 * (co + co.T) + smoothing  # symmetric by construction; the noise is not
    prior_cat = np.log(co / co.sum(axis=1, keepdims=True))
    return prior_item.astype(np.float32), prior_cat.astype(np.float32)


def total_from_replies(replies: list, length: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """(summed release, stores that released, failures) from the stores' replies: a reply
    with an error, or with a release of the wrong length or a non-finite value, is a failure
    and adds nothing. ``replies`` are (store label, vector or None, reason) triples."""
    total = np.zeros(length, dtype=np.float64)
    released, failed = [], []
    for store, vector, reason in replies:
        if vector is None:
            failed.append({"store": store, "reason": reason})
            continue
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (length,) or not np.isfinite(vector).all():
            failed.append({"store": store, "reason": f"a release must be {length} finite values"})
            continue
        total += vector
        released.append(store)
    return total, released, failed
