"""`storefed privacy`: what a store's ledger says, for the store's operator, and the
operator's actions on it (clear a crashed run's reservation, repair a damaged ledger,
accept a ledger whose head was lost).

Reads the ledger as the ClientApp does (verified against its head), recomputes ε from every
event and open reservation, and estimates how many more rounds fit in the budget at the
settings of the last event.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

from client.state import ledger as store_ledger
from client.state.ledger import head_path, ledger_path
from client.state.paths import StorePaths
from common.data.storefiles import DataError, read_store_meta
from common.privacy import accountant as privacy
from common.privacy.published_size import declared_size
from client.store_policy import STORE_DEFAULT_BUDGET

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
    state = StorePaths.at(store_dir, state_dir=state_dir).state_dir
    ledger = store_ledger.read_ledger(state, store_id)
    events = list(ledger.events)
    history = [e.mechanism() for e in events]
    # The store accounts at the δ of its latest event (δ follows the store's size).
    delta = _delta(ledger, meta)
    if budget is None:
        budget = float(meta.get("epsilon_budget", STORE_DEFAULT_BUDGET) or STORE_DEFAULT_BUDGET)
    # Open reservations count as spent (a run is training them, or crashed while it did).
    spent = privacy.epsilon(ledger.counted(), delta, accountant)
    try:
        published, _ = declared_size(meta, {})
    except ValueError as exc:
        raise DataError(f"{store_dir / 'store.json'}: {exc}") from None
    # "Rounds like the last one": a DP-SGD round, not the run's explore release (round 0, DESIGN §5.3).
    rounds = [e for e in events if e.round > 0]
    last = rounds[-1].mechanism() if rounds else None
    return {
        "store_id": store_id,
        "epsilon": spent,
        "epsilon_events": privacy.epsilon(history, delta, accountant) if ledger.open else spent,
        "reservations": [{"id": r.id, "run_id": r.planned.run_id, "round": r.planned.round,
                          "noise_multiplier": r.planned.noise_multiplier, "sample_rate": r.planned.sample_rate,
                          "steps": r.planned.steps, "at": r.planned.at,
                          "epsilon": privacy.epsilon([r.planned.mechanism()], delta, accountant)}
                         for r in ledger.open],
        "delta": delta,
        "budget": budget,
        "accountant": accountant,
        "remaining_rounds": remaining_rounds(ledger.counted(), last, delta, budget, accountant),
        # What sets q, steps, σ, δ and the FedAvg weight; None: the store cannot train with DP.
        "published_size": published,
        "events": [{k: v for k, v in asdict(e).items() if k != "accountant"} for e in events],
        "ledger": str(ledger_path(state)),
        "head": str(head_path(state)),
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
    if report["reservations"]:
        lines.append(f"open reservations (counted as spent; ε {report['epsilon_events']:.3f} without them):")
        for r in report["reservations"]:
            lines.append(f"  {r['id']}: run {r['run_id']} round {r['round']} (ε {r['epsilon']:.3f} alone), "
                         f"since {r['at']}")
        lines.append("  a reservation whose run crashed stays spent until you clear it: "
                     "storefed privacy --store-dir DIR --clear-reservation ID")
    if report["events"]:
        lines.append(f"{'run':>22} {'round':>5} {'σ':>7} {'q':>8} {'steps':>6} {'C':>5}  at")
        for e in report["events"]:
            lines.append(f"{e['run_id']:>22} {e['round']:>5} {e['noise_multiplier']:7.3f} {e['sample_rate']:8.4f} "
                         f"{e['steps']:>6} {e['clip_norm']:5.2f}  {e['at']}")
        if any(e["round"] == 0 and e["run_id"] != "lost-spend" for e in report["events"]):
            lines.append("round 0: the run's explore release (one Gaussian release, q = 1; DESIGN §5.3)")
    return "\n".join(lines)


def _delta(ledger, meta: dict) -> float:
    if ledger.latest is not None:
        return ledger.latest.delta
    return float(meta.get("delta", 0) or 0) or privacy.DEFAULT_DELTA


def _store(store_dir: Path, state_dir: Path | None) -> tuple[str, Path]:
    store_dir = Path(store_dir).expanduser().resolve()
    if not store_dir.is_dir():
        raise DataError(f"{store_dir}: store directory not found")
    return str(read_store_meta(store_dir)["store_id"]), StorePaths.at(store_dir, state_dir=state_dir).state_dir


Confirm = Callable[[str], bool]


def clear_reservation(store_dir: Path, state_dir: Path | None, reservation_id: str, confirm: Confirm,
                      accountant: str = "prv") -> tuple[bool, str]:
    """Release a reservation left by a crashed run, after ``confirm(question)``.

    Returns (done, what happened). Only for a run that is no longer training: a round that
    still commits later is recorded all the same (never under-counted).
    """
    store_id, state = _store(store_dir, state_dir)
    ledger = store_ledger.read_ledger(state, store_id)
    found = ledger.find(reservation_id)
    if found is None:
        open_ids = ", ".join(r.id for r in ledger.open) or "none"
        raise DataError(f"{ledger_path(state)}: no open reservation '{reservation_id}' (open: {open_ids})")
    delta = _delta(ledger, read_store_meta(Path(store_dir).expanduser().resolve()))
    alone = privacy.epsilon([found.planned.mechanism()], delta, accountant)
    before = privacy.epsilon(ledger.counted(), delta, accountant)
    rest = ledger.history() + [r.planned.mechanism() for r in ledger.open if r.id != reservation_id]
    after = privacy.epsilon(rest, delta, accountant)
    what = (f"the reservation of run {found.planned.run_id} round {found.planned.round} (ε {alone:.3f}) "
            f"is released; the store's spend drops from {before:.3f} to {after:.3f}")
    question = (f"store {store_id}, {ledger_path(state)}: {what.replace(' is released', ' will be released')}"
                .replace("spend drops", "spend will drop")
                + ".\nDo this only if that run is no longer training (it crashed or was stopped). Release it?")
    if not confirm(question):
        return False, "nothing changed"
    store_ledger.release(state, store_id, reservation_id, "cleared by the store's operator (storefed privacy)",
                         lambda h: privacy.epsilon(h, delta, accountant))
    return True, what


def repair(store_dir: Path, state_dir: Path | None, confirm: Confirm, backup: Path | None = None,
           accountant: str = "prv") -> tuple[bool, str]:
    """Repair a ledger that is cut short, altered or missing, keeping at least the spend its
    head recorded (lost-spend events stand in for the records that were lost)."""
    store_id, state = _store(store_dir, state_dir)
    plan = store_ledger.plan_repair(state, store_id, backup)
    recorded = privacy.epsilon(list(plan.head.history), plan.head.delta or privacy.DEFAULT_DELTA, accountant)
    after = privacy.epsilon(plan.ledger.counted(), plan.head.delta or privacy.DEFAULT_DELTA, accountant)
    lost = "; ".join(f"σ {s:.4g}, q {q:.4g}, {t} steps" for s, q, t in plan.lost) or "none"
    what = (f"the ledger is rewritten from the {plan.kept} intact records of {plan.source}, with lost-spend "
            f"events for what {head_path(state)} counted beyond them ({lost}); the store's spend is "
            f"ε {after:.3f} (its head recorded {recorded:.3f})")
    if not confirm(f"store {store_id}: {what.replace(' is rewritten', ' will be rewritten')}.\n"
                   "Stop the store's daemon first. Repair?"):
        return False, "nothing changed"
    kept = store_ledger.apply_repair(state, plan, lambda h: privacy.epsilon(h, plan.head.delta or privacy.DEFAULT_DELTA,
                                                                           accountant))
    return True, what + (f"; the damaged ledger is kept as {kept}" if kept else "")


def accept_ledger(store_dir: Path, state_dir: Path | None, confirm: Confirm, accountant: str = "prv") -> tuple[bool, str]:
    """Rebuild a lost head from the ledger as it stands (its hash chain must verify)."""
    store_id, state = _store(store_dir, state_dir)
    path = ledger_path(state)
    from common.privacy.ledger import parse

    if not path.exists():
        raise DataError(f"{path}: missing; nothing to accept")
    try:
        ledger = parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    spent = privacy.epsilon(ledger.counted(), _delta(ledger, {}), accountant)
    what = (f"{head_path(state)} is rebuilt from {path} as it stands ({ledger.seq} records, ε {spent:.3f}); "
            "records lost from its end, if any, stay lost")
    if not confirm(f"store {store_id}: {what.replace(' is rebuilt', ' will be rebuilt')}.\n"
                   "Do this only if you know the ledger is complete (e.g. it matches your backup). Accept it?"):
        return False, "nothing changed"
    store_ledger.accept_ledger(state, store_id, lambda h: privacy.epsilon(h, _delta(ledger, {}), accountant))
    return True, what
