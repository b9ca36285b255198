"""`storefed privacy`: what a store's ledger says, for the store's operator.

Reads the ledger as the ClientApp does, recomputes ε from every event, and estimates how
many more rounds fit in the budget at the settings of the last event.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from client.ledger import ledger_path, read_events
from common.privacy import accountant as privacy
from common.data.storefiles import DataError, read_store_meta
from common.privacy.published_size import declared_size

DEFAULT_BUDGET = 8.0
_MAX_ROUNDS_SHOWN = 1000


def remaining_rounds(history: list, next_round: tuple[float, float, int] | None, delta: float,
                     budget: float, accountant: str) -> int:
    """How many more rounds like ``next_round`` keep ε within ``budget`` (capped at 1000)."""
    if next_round is None or next_round[0] <= 0:
        return 0
    lo, hi = 0, 1
    # Grow then bisect: ε is monotone in the number of rounds.
    while hi <= _MAX_ROUNDS_SHOWN and privacy.epsilon(history + [next_round] * hi, delta, accountant) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, _MAX_ROUNDS_SHOWN + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if privacy.epsilon(history + [next_round] * mid, delta, accountant) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def privacy_report(store_dir: Path, state_dir: Path | None = None, *, accountant: str = "prv",
                   budget: float | None = None) -> dict:
    """The `storefed privacy --json` object for one store."""
    store_dir = Path(store_dir).expanduser().resolve()
    if not store_dir.is_dir():
        raise DataError(f"{store_dir}: store directory not found")
    meta = read_store_meta(store_dir)
    store_id = str(meta["store_id"])
    state = Path(state_dir).expanduser().resolve() if state_dir else store_dir / "state"
    events = read_events(state, store_id)
    history = [e.mechanism() for e in events]
    # The store accounts at the δ of its latest event (δ follows the store's size).
    delta = events[-1].delta if events else float(meta.get("delta", 0) or 0) or privacy.DEFAULT_DELTA
    if budget is None:
        budget = float(meta.get("epsilon_budget", DEFAULT_BUDGET) or DEFAULT_BUDGET)
    spent = privacy.epsilon(history, delta, accountant)
    try:
        published, _ = declared_size(meta, {})
    except ValueError as exc:
        raise DataError(f"{store_dir / 'store.json'}: {exc}") from None
    last = events[-1].mechanism() if events else None
    return {
        "store_id": store_id,
        "epsilon": spent,
        "delta": delta,
        "budget": budget,
        "accountant": accountant,
        "remaining_rounds": remaining_rounds(history, last, delta, budget, accountant),
        # What sets q, steps, σ, δ and the FedAvg weight; None: the store cannot train with DP.
        "published_size": published,
        "events": [{k: v for k, v in asdict(e).items() if k != "accountant"} for e in events],
        "ledger": str(ledger_path(state)),
        "runs": sorted({e.run_id for e in events}),
    }


def render_privacy(report: dict) -> str:
    """Human text: the totals, then one line per event."""
    lines = [
        f"store {report['store_id']}: ε = {report['epsilon']:.3f} spent of budget {report['budget']:g} "
        f"(δ = {report['delta']:.0e}, {report['accountant']} accountant, member-level)",
        f"rounds left at the last round's settings: {report['remaining_rounds']}",
        (f"published size: {report['published_size']} (sets q, steps, σ, δ and the FedAvg weight; the exact count "
         "never leaves; 'storefed validate' compares the two)" if report["published_size"] is not None else
         "published size: none declared in store.json — a deployed store does not train with DP until it declares "
         "one ('storefed validate' suggests a value)"),
        f"ledger: {report['ledger']} · {len(report['events'])} events in {len(report['runs'])} runs",
    ]
    if report["events"]:
        lines.append(f"{'run':>22} {'round':>5} {'σ':>7} {'q':>8} {'steps':>6} {'C':>5}  at")
        for e in report["events"]:
            lines.append(f"{e['run_id']:>22} {e['round']:>5} {e['noise_multiplier']:7.3f} {e['sample_rate']:8.4f} "
                         f"{e['steps']:>6} {e['clip_norm']:5.2f}  {e['at']}")
    return "\n".join(lines)
