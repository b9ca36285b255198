"""`storefed audit`: an empirical check of one store's DP guarantee (issue 17, item 6).

1. A small chain is generated (common.data.synth) and ``canaries`` extra members are made
   for its first store: each has two receipts before the test cut, a few random items and
   then a basket of items no one else is given (distinctive: worst-case members). Each
   canary is written into the store's files with probability ½; who is in stays here.
2. Every store trains with the store's DP-SGD (common.learning.training.train_local with
   DPConfig, σ calibrated with common.privacy.accountant so that the planned rounds end at the
   target ε; without DP: the plain optimiser the ClientApp uses) — one local epoch a round,
   every layer trained, no explore release (DESIGN §5.3): what is audited is the DP-SGD
   updates —, the updates averaged by FedAvg
   weighted by the examples count, for ``rounds`` rounds. The privacy events the audited
   store would write to its ledger are kept, and ``epsilon`` is their ε.
3. The one-run audit (simulations.audit_bound) scores each canary on what leaves the store:
   the sum over rounds of its loss under the global model it received minus its loss under
   the model it sent back. 4. A loss-threshold membership-inference attack on the final
   global model: AUC of −loss between the canaries in and out.

The training loop is the plain loop of the benchmarks, not Flower: the store's side of it
(data preparation, train_local, σ, the events) is the store's own code.
"""

from __future__ import annotations

import math
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

# The audited store's first canary receipt falls in this window of days after the chain's
# start, the second 1–60 days later: both well before the 28-day test period.
_FIRST_DAY = (20, 240)
_HISTORY_ITEMS = 3


@dataclass(frozen=True)
class AuditSettings:
    stores: int = 3
    canaries: int = 1000
    epsilon: float | None = 8.0  # target ε of the audited run per store; None: no DP
    rounds: int = 5
    members: int = 1500  # people in the generated chain
    items: int = 2000
    seed: int = 0
    confidence: float = 0.95
    noise_multiplier: float = 0.0  # > 0: this σ at every store instead of calibrating to ε (tests)


def _canaries(settings: AuditSettings, catalog: pd.DataFrame, start: date, store_id: str,
              rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(members rows, transaction rows) of every canary, as the data contract has them."""
    m, n_items = settings.canaries, len(catalog)
    per = max(1, min(3, n_items // (2 * m)))  # target items per canary, none shared
    if per * m > n_items:
        raise ValueError(f"{m} canaries need at least {m} catalog items")
    targets = rng.permutation(n_items)[:per * m].reshape(m, per)
    item_ids, prices = catalog["item_id"].to_numpy(), catalog["price"].to_numpy()
    members, lines = [], []
    for c in range(m):
        member = f"CANARY{c:05d}"
        # No birth year, gender or tier, and an old join date: the profile is the same
        # whatever cut day the store's data gives it.
        members.append({"member_id": member, "join_date": "2010-01-01", "birth_year": "", "gender": "",
                        "tier": "", "consent_training": "true"})
        others = np.setdiff1d(np.arange(n_items), targets[c])
        history = rng.choice(others, _HISTORY_ITEMS, replace=False)
        first = int(rng.integers(*_FIRST_DAY))
        days = (first, first + int(rng.integers(1, 61)))
        for j, (basket, day) in enumerate(zip((history, targets[c]), days)):
            ts = (start + timedelta(days=day)).isoformat() + "T12:00:00"
            for item in basket:
                lines.append({"receipt_id": f"{store_id}-C{c:05d}-{j}", "ts": ts, "member_id": member,
                              "item_id": item_ids[item], "quantity": 1, "unit_price": float(prices[item]),
                              "promo": "", "channel": "pos"})
    return pd.DataFrame(members), pd.DataFrame(lines)


def _with_rows(frame: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([frame, extra.astype({c: frame[c].dtype for c in extra.columns if c in frame})],
                     ignore_index=True)


def _losses(model, examples, rows: np.ndarray) -> np.ndarray:
    """Each row's basket loss under ``model`` as it is (its item snapshot untouched)."""
    import torch

    from common.learning.model import BasketLoss
    from common.learning.training import batch_tensors

    loss = BasketLoss(reduction="none")
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), 512):
            *inputs, t_items, t_mask = batch_tensors(examples, rows[start:start + 512])
            out.append(loss(model(*inputs), t_items, t_mask).numpy())
    return np.concatenate(out).astype(float)


def _check_same_examples(trained, examples, reference_rows: np.ndarray) -> None:
    """A canary's example in the store that trained is the one it is scored on.

    ``reference_rows``: the included canaries' rows in ``examples``, in ``trained``'s
    member order of them. A canary has two receipts, so its example is not random.
    """
    from common.data.dataset import sample_train_examples

    own = sample_train_examples(trained, np.random.default_rng(1))
    mine = np.flatnonzero(np.char.startswith(trained.member_ids.astype(str), "CANARY"))
    for name in ("hist_items", "hist_feat", "hist_mask", "profile", "target_items", "target_mask"):
        if not np.array_equal(getattr(own, name)[mine], getattr(examples, name)[reference_rows]):
            raise AssertionError(f"a canary's {name} differs between the trained store and the audit's copy")


def run_audit(settings: AuditSettings, work: Path | None = None) -> dict:
    """Generate, train, audit; the `storefed audit --json` object."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="storefed-audit-") as tmp:
            return run_audit(settings, Path(tmp))
    import torch

    from common.config import DEFAULTS
    from common.data.ingest import prepare_store
    from common.data.dataset import sample_train_examples
    from common.data.storefiles import write_chain
    from common.data.synth import ChainSpec, generate_chain
    from common.evaluation.audience import roc_auc
    from common.learning.model import ModelConfig, Recommender
    from common.learning.training import DPConfig, TrainConfig, sample_rate_for, steps_per_epoch, train_local
    from common.privacy.published_size import bucket
    from common.privacy import accountant as privacy
    from simulations.audit_bound import one_run_audit

    began = time.perf_counter()
    if settings.epsilon is not None and not (math.isfinite(settings.epsilon) and settings.epsilon > 0):
        raise ValueError("--epsilon must be a finite number > 0")
    if settings.canaries < 2 or settings.stores < 1 or settings.rounds < 1:
        raise ValueError("need at least 2 canaries, 1 store and 1 round")
    rng = np.random.default_rng(settings.seed)
    spec = ChainSpec(stores=settings.stores, members=settings.members, items=settings.items, seed=settings.seed,
                     min_store_members=min(100, settings.members // settings.stores))
    chain = generate_chain(spec)
    audited = chain.stores[0]
    canary_members, canary_lines = _canaries(settings, chain.catalog, spec.start, audited.store_id, rng)
    included = rng.random(settings.canaries) < 0.5  # the secret: which canaries are in
    ids_in = set(canary_members["member_id"][included])
    # The store with every canary, only to build each canary's example (public to the auditor).
    everyone = _with_rows(audited.members, canary_members), _with_rows(audited.transactions, canary_lines)
    write_chain(chain, work / "all")
    everyone[0].to_csv(work / "all" / "stores" / audited.store_id / "members.csv", index=False)
    everyone[1].to_csv(work / "all" / "stores" / audited.store_id / "transactions.csv", index=False)
    audited.members = _with_rows(audited.members, canary_members[included])
    audited.transactions = _with_rows(audited.transactions,
                                      canary_lines[canary_lines["member_id"].isin(ids_in)])
    write_chain(chain, work / "chain")

    stores = [prepare_store(d, work / "chain")[0] for d in sorted((work / "chain" / "stores").iterdir())]
    reference, _ = prepare_store(work / "all" / "stores" / audited.store_id, work / "all")
    examples = sample_train_examples(reference, np.random.default_rng(0))
    position = {mid: i for i, mid in enumerate(reference.member_ids)}
    rows = np.array([position[mid] for mid in canary_members["member_id"]])
    in_order = np.argsort(canary_members["member_id"].to_numpy()[included])  # member ids sort as the store does
    _check_same_examples(stores[0], examples, rows[included][in_order])

    batch, clip = int(DEFAULTS["batch-size"]), float(DEFAULTS["clip-norm"])
    dp = settings.epsilon is not None
    sigmas, deltas = [], []
    # Each store's published size sets q, steps, σ, δ and the divisor (DESIGN §4.1). The audited
    # store publishes the size with every canary in, so the mechanism is the same whichever
    # canaries the coin put in (the one-run theorem assumes a fixed mechanism).
    published = [bucket(reference.n_train_members if s == 0 else data.n_train_members)
                 for s, data in enumerate(stores)]
    for s, data in enumerate(stores):
        n = published[s]
        q, steps = sample_rate_for(n, batch), settings.rounds * steps_per_epoch(n, batch)
        deltas.append(privacy.store_delta(n, float(DEFAULTS["delta"])))
        if not dp:
            sigmas.append(0.0)
        elif settings.noise_multiplier > 0:
            sigmas.append(settings.noise_multiplier)
        else:
            sigmas.append(privacy.calibrate_noise(settings.epsilon, deltas[-1], q, steps, str(DEFAULTS["accountant"])))

    model_cfg = ModelConfig(dim=int(DEFAULTS["dim"]), hidden=int(DEFAULTS["hidden"]))
    torch.manual_seed(settings.seed)
    global_state = {k: v.clone() for k, v in Recommender(stores[0].items, model_cfg).state_dict().items()}
    scores = np.zeros(settings.canaries)
    history: list[tuple[float, float, int]] = []
    for server_round in range(1, settings.rounds + 1):
        states, weights = [], []
        for s, data in enumerate(stores):
            model = Recommender(data.items, model_cfg)
            model.load_state_dict(global_state)
            seed = zlib.crc32(f"{settings.seed}|{data.store_id}|{server_round}".encode())
            if dp:
                cfg = TrainConfig(batch_size=batch, lr=float(DEFAULTS["dp-lr"]), optimizer=str(DEFAULTS["dp-optimizer"]),
                                  seed=seed)
                result = train_local(model, data, cfg, DPConfig(sigmas[s], clip, published[s]))
            else:
                result = train_local(model, data, TrainConfig(batch_size=batch, lr=float(DEFAULTS["lr"]), seed=seed),
                                     None)
            if s == 0:
                if dp:
                    history.append((sigmas[0], result.sample_rate, result.steps))
                # What left the store this round, against what it received: train_local set
                # the item snapshot from the received (public) model, and it is still there.
                received = Recommender(data.items, model_cfg)
                received.load_state_dict(global_state)
                received.item_snapshot.copy_(model.item_snapshot)
                scores += _losses(received, examples, rows) - _losses(model, examples, rows)
            states.append(model.state_dict())
            weights.append(result.examples)
        total = float(sum(weights))
        global_state = {k: sum(st[k] * (w / total) for st, w in zip(states, weights)) for k in global_state}

    final = Recommender(stores[0].items, model_cfg)
    final.load_state_dict(global_state)
    final.refresh_item_snapshot()  # as a store serving the global model does
    mia_auc = roc_auc(-_losses(final, examples, rows), included)
    audit = one_run_audit(scores, included, delta=deltas[0], confidence=settings.confidence)
    epsilon = privacy.epsilon(history, deltas[0], str(DEFAULTS["accountant"])) if dp else None
    return {
        "epsilon": epsilon,
        "epsilon_lower_bound": audit.epsilon_lower_bound,
        "canaries": settings.canaries,
        "mia_auc": float(mia_auc),
        "canaries_in": int(included.sum()),
        "bound_within_epsilon": (audit.epsilon_lower_bound <= epsilon) if dp else None,
        "dp": dp,
        "target_epsilon": settings.epsilon,
        "delta": deltas[0],
        "noise_multiplier": sigmas[0],
        "confidence": settings.confidence,
        "guesses": audit.guesses,
        "correct_guesses": audit.correct,
        "guess_counts": list(audit.tried),
        "audited_store": audited.store_id,
        "members_audited_store": stores[0].n_train_members,
        "stores": settings.stores,
        "rounds": settings.rounds,
        "score": "Σ over rounds of the canary's loss under the received global model minus under the store's update",
        "elapsed_s": round(time.perf_counter() - began, 1),
    }
