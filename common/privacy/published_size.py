"""A store's published size: the one member count the DP mechanism may depend on. Pure.

DP-SGD's accounting assumes add/remove neighbours: the same store with one member more or
fewer. Everything that leaves the store must then be computable from public settings and
the DP update alone. If the sampling rate, the expected batch that divides the noised sum,
the number of steps, σ, δ or the FedAvg weight followed the exact member count, the
update's shape (and the weight, outright) would tell one neighbour from the other. So each
store *declares* a size (``published_size`` in store.json, or ``published-size`` in its
node config); the mechanism uses it alone, and the exact count stays in the store.

Privacy does not depend on the declared size being right: with q fixed, the Poisson
subsampled Gaussian's guarantee holds for any number of members. Utility does: each
member is drawn with probability q = batch / published, so a real store larger than its
published size takes larger steps than planned, and a much smaller one adds the same noise
to a smaller signal. Hence the warnings of :func:`size_warning`.

The suggested value (and the simulation's fallback) is the exact count rounded *up* to
the R10 series of preferred numbers (ISO 3: 1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8 × 10^k;
steps of ~26 %): a fixed public grid, so at most a quarter of the signal is given up, and
nobody tunes it to a store. A bucket computed from the current count at every round would
still move when one member crosses a grid value; that is why a deployed store must declare
its size once, as a setting, and a simulation's fallback is only that.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
MAX_PUBLISHED = 10**9
# Below this share of the published size a store warns: its steps carry < 1/4 of the
# signal the noise was planned for.
SMALL_SHARE = 0.25


def bucket(n: int) -> int:
    """The smallest value of the R10 grid (as an integer ≥ 10) that is ≥ ``n``."""
    n = max(int(n), 1)
    exponent = 1
    while True:
        for mantissa in R10:
            value = math.ceil(round(mantissa * 10**exponent, 6))  # 12.5 → 13: never below the grid
            if value >= n:
                return value
        exponent += 1


def declared_size(meta: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[int | None, str]:
    """``(size, where it was declared)``; ``(None, "")`` when the store declares none.

    The node config's ``published-size`` wins over store.json's ``published_size`` (both are
    the store's own settings). A value that is not a whole number in 1..10⁹ is an error
    (``ValueError`` naming the setting).
    """
    for source, key, where in ((node_config, "published-size", "node config 'published-size'"),
                               (meta, "published_size", "store.json 'published_size'")):
        value = source.get(key)
        if value in (None, ""):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a whole number of members, got {value!r}") from None
        if not (math.isfinite(number) and number == int(number) and 1 <= number <= MAX_PUBLISHED):
            raise ValueError(f"{where} must be a whole number of members in 1..{MAX_PUBLISHED}, got {value!r}")
        return int(number), where
    return None, ""


def size_warning(real: int, published: int) -> str | None:
    """Why the exact count and the published size are too far apart, or None.

    For the store's own log and its operator's commands only: it holds the exact count.
    """
    if real > published:
        return (f"the store has {real} training members, more than its published size {published}: each "
                f"step samples about {real / published:.2f}× the planned batch, so updates are larger than "
                "planned (privacy is unaffected); raise published_size")
    if not real >= SMALL_SHARE * published:
        return (f"the store has {real} training members, under a quarter of its published size {published}: "
                f"each step carries about {real / published:.0%} of the signal the noise was planned for "
                "(privacy is unaffected); lower published_size")
    return None
