"""The chain's explore prior from the stores' DP releases (DESIGN §5.3). Pure: numpy.

The server sums the stores' noised vectors (:mod:`client.explore_release`) and turns the sum
into the model's two prior arrays. Everything here is post-processing of DP outputs: it
costs no ε, whatever it does.

* ``prior_item[i] = log(1 + max(0, pop_i − cut))``: smoothed log-popularity (a member with k
  items adds 1/√(2k) to each), so an item sold anywhere in the chain ranks by the chain's
  demand;
* ``prior_cat[c, c'] = log P(c' | c)`` from the symmetric co-occurrence, likewise cut and
  each row smoothed by ``smoothing`` pseudo-counts per cell before normalising.

``cut`` is 0 by default. A soft threshold at two noise deviations of the sum (``√(Σ σ_r²)``
over the stores that released; each reply states its σ_r) was measured and lost
(simulations/results/dp-design/report.md: at ε 1 "all" 0.3707 → 0.3320 on the generated
chain): it makes the prior sharp on the few items above the noise, and those then crowd out
the members' own items. The server still reports the sum's noise deviation with the run.
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


def shrunk_popularity(noisy: np.ndarray, noise_std: float, category: np.ndarray) -> np.ndarray:
    """Each item's noised popularity shrunk toward its category's mean (empirical Bayes).

    ``noisy = pop + N(0, noise_std²)`` per item. Within a category of n items the mean is
    known to noise_std / √n, and the spread of the true values is estimated as the items'
    variance less the noise's (positive part): each item keeps the share
    ``w = τ² / (τ² + noise_std²)`` of its distance to that mean (James–Stein, per category).
    A tail item whose count is all noise falls back to its category's demand; a clearly
    popular one keeps most of its own. Categories of fewer than 3 items use the catalog's
    mean and spread. Post-processing of the DP sum: no ε.
    """
    noisy = np.asarray(noisy, dtype=np.float64)
    category = np.asarray(category, dtype=np.int64)
    var = float(noise_std) ** 2
    if var <= 0:
        return noisy.copy()
    out = np.empty_like(noisy)

    def shrink(values: np.ndarray) -> np.ndarray:
        mean = float(values.mean())
        tau2 = max(float(values.var(ddof=1)) - var, 0.0) if len(values) > 1 else 0.0
        return mean + tau2 / (tau2 + var) * (values - mean)

    whole = shrink(noisy)
    for c in np.unique(category):
        rows = np.flatnonzero(category == c)
        out[rows] = shrink(noisy[rows]) if len(rows) >= 3 else whole[rows]
    return out


def prior_arrays(total: np.ndarray, n_items: int, n_categories: int, cut: float = 0.0,
                 smoothing: float = 1.0, noise_std: float = 0.0,
                 item_category: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prior_item [n_items], prior_cat [n_categories, n_categories]) from the summed release;
    values are soft-thresholded at ``cut`` (0: not at all, the default). With ``noise_std``
    (the sum's noise deviation) and ``item_category``, the item part is first shrunk toward
    each category's mean (:func:`shrunk_popularity`)."""
    items = np.asarray(total[:n_items], dtype=np.float64)
    if noise_std > 0 and item_category is not None:
        items = shrunk_popularity(items, noise_std, item_category)
    pop = np.maximum(items - cut, 0.0)
    prior_item = np.log1p(pop)
    co = np.maximum(total[n_items:].reshape(n_categories, n_categories) - cut, 0.0)
    co = 0.5 * (co + co.T) + smoothing  # symmetric by construction; the noise is not
    prior_cat = np.log(co / co.sum(axis=1, keepdims=True))
    return prior_item.astype(np.float32), prior_cat.astype(np.float32)


def total_from_replies(replies: list, length: int) -> tuple[np.ndarray, float, list[str], list[dict]]:
    """(summed release, its noise standard deviation, stores that released, failures) from the
    stores' replies: a reply with an error, with a release of the wrong length or a
    non-finite value, or with an unusable σ, is a failure and adds nothing. ``replies`` are
    (store label, vector or None, σ_r, reason) tuples."""
    total = np.zeros(length, dtype=np.float64)
    variance = 0.0
    released, failed = [], []
    for store, vector, sigma, reason in replies:
        if vector is None:
            failed.append({"store": store, "reason": reason})
            continue
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (length,) or not np.isfinite(vector).all():
            failed.append({"store": store, "reason": f"a release must be {length} finite values"})
            continue
        if not (np.isfinite(sigma) and sigma >= 0):
            failed.append({"store": store, "reason": f"its noise multiplier {sigma!r} is not a number ≥ 0"})
            continue
        total += vector
        variance += float(sigma) ** 2
        released.append(store)
    return total, float(np.sqrt(variance)), released, failed
