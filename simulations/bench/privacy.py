"""`storefed bench privacy`: our ε from a history against Google's dp-accounting PLD accountant.

The reference needs the test extra (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import time

from common.privacy import accountant as privacy

SETTINGS = [  # (σ, q, steps per round, rounds)
    (1.0, 0.01, 100, 10),
    (0.8, 0.05, 20, 10),
    (2.0, 0.1, 10, 10),
    (1.2, 0.02, 50, 10),
    (0.7, 0.25, 4, 10),
    (1.1, 0.125, 8, 10),
]


def pld_epsilon(history: list[tuple[float, float, int]], delta: float, relation: str = "add_remove") -> float:
    """ε of the composed history by dp-accounting's PLD accountant (the outside reference),
    under add/remove of one member (``"add_remove"``, what stores promise) or under
    replacing one member by another (``"replace_one"``)."""
    try:
        import dp_accounting as dpa
    except ImportError as exc:
        raise SystemExit("storefed bench privacy needs dp-accounting: pip install -e \".[test]\"") from exc
    kinds = {"add_remove": dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
             "replace_one": dpa.NeighboringRelation.REPLACE_ONE}
    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), t) for s, q, t in history]
    accountant = dpa.pld.PLDAccountant(neighboring_relation=kinds[relation])
    return accountant.compose(dpa.ComposedDpEvent(events)).get_epsilon(delta)


def bench_privacy(delta: float = 1e-6) -> list[dict]:
    rows = []
    for sigma, q, steps, rounds in SETTINGS:
        history = [(sigma, q, steps)] * rounds
        start = time.perf_counter()
        ours = privacy.epsilon(history, delta, "prv")
        ours_s = time.perf_counter() - start
        rdp = privacy.epsilon(history, delta, "rdp")
        reference = pld_epsilon(history, delta)
        rows.append({"sigma": sigma, "q": q, "steps": steps, "rounds": rounds, "epsilon_prv": ours,
                     "epsilon_rdp": rdp, "epsilon_pld": reference, "ratio": ours / reference,
                     "prv_seconds": round(ours_s, 3)})
    return rows
