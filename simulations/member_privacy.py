"""A member across the chain (DESIGN §4.1): the ε of one person over every store. Pure.

A member who trains at several stores is one person; what each store sends composes.
Their chain-wide ε is that of the concatenation of the ledgers of every store they trained
at (each a list of DP-SGD mechanisms), accounted at the smallest of those stores' δ. With
home stores (each member trains only at the store named by ``home_store``), every member
trains at one store and their chain-wide ε is that store's: within its budget by design.
This module computes it rather than assuming it, from ledgers and training membership.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from common.privacy import accountant as privacy

Mechanism = privacy.Mechanism


def chain_epsilon(stores: Iterable[str], histories: Mapping[str, list[Mechanism]], deltas: Mapping[str, float],
                  accountant: str = "prv") -> float:
    """ε of one member who trained at ``stores``: every one of their ledgers, composed."""
    stores = sorted(set(stores))
    history = [m for s in stores for m in histories.get(s, [])]
    if not history:
        return 0.0
    delta = min(deltas[s] for s in stores if histories.get(s))
    return privacy.epsilon(history, delta, accountant)


def member_privacy(histories: Mapping[str, list[Mechanism]], deltas: Mapping[str, float],
                   trained: Mapping[str, Iterable[str]], registered: Mapping[str, Iterable[str]],
                   budget: float, accountant: str = "prv") -> dict:
    """The `member_privacy` object of `storefed simulate --json`.

    ``histories``/``deltas``: each store's ledger and δ. ``trained``: store → the member ids
    it trains with DP. ``registered``: store → every member id in its members file (to count
    people at several stores). ε is computed once per distinct set of stores a member
    trained at (few sets; many members).
    """
    stores_of: dict[str, set[str]] = {}
    for store, members in trained.items():
        for member in members:
            stores_of.setdefault(str(member), set()).add(store)
    seen: dict[str, int] = {}
    for members in registered.values():
        for member in set(map(str, members)):
            seen[member] = seen.get(member, 0) + 1
    groups = {frozenset(s) for s in stores_of.values()}
    epsilons = {g: chain_epsilon(g, histories, deltas, accountant) for g in groups}
    worst = max(epsilons, key=lambda g: epsilons[g], default=frozenset())
    return {
        "max_epsilon": epsilons.get(worst, 0.0),
        "members_at_several_stores": sum(1 for n in seen.values() if n > 1),
        "budget": budget,
        # Extra keys: how many people trained at more than one store, and where the worst did.
        "members_trained_at_several_stores": sum(1 for s in stores_of.values() if len(s) > 1),
        "max_epsilon_stores": sorted(worst),
    }
