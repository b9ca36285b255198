"""One round of DP-SGD at a store, and what it costs in ε (DESIGN §4.1, §4.2). No Flower.

Everything that decides a store's privacy spend is here, in the order it happens:

1. **The plan** (:func:`dp_plan`): the sampling rate q and the steps follow the store's
   *published* size and the run's batch size and local epochs; σ is the run's, or calibrated
   (:func:`common.privacy.accountant.calibrate_noise`) so that the run's planned rounds alone
   reach its ε target; δ is the store's (:func:`client.policy.store_settings`) capped at
   1/(10 × published size). None of it follows the exact member count.
2. **Reserve** (:func:`client.state.ledger.reserve`): under the ledger's lock, ε of every
   counted event (committed ones and open reservations of any run,
   :meth:`common.privacy.ledger.Ledger.counted`) plus this round must stay within the budget;
   otherwise the round is declined and nothing is trained.
3. **Train** (:func:`common.learning.training.train_local`) with that σ and the clip norm;
   a failure releases the reservation (nothing was built from the noise).
4. **Commit** durably, before the update may leave the store: a crash from here on
   over-counts, never under-counts.

ε itself is :func:`common.privacy.accountant.epsilon` of those counted mechanisms at the
store's δ (:func:`spent_epsilon`).
"""

from __future__ import annotations

import math
import secrets
import sys
import zlib
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from client.state import ledger
from client.store import StoreNode
from common.config import RunConfig
from common.learning.model import Recommender
from common.learning.training import DPConfig, TrainConfig, train_local
from common.privacy import accountant as privacy
from common.privacy.accountant import expected_batch, sample_rate_for, steps_per_epoch
from common.privacy.ledger import LedgerError, PrivacyEvent, budget_decision


@dataclass(frozen=True)
class DPPlan:
    """Everything of one round's DP mechanism that is seen outside the store, and what sets
    it: all of it follows the published size and the run's settings, none the exact count."""

    published_size: int
    sample_rate: float
    steps: int  # this round's steps (local epochs × steps per epoch)
    noise_multiplier: float
    divisor: int  # the expected batch that divides the noised sum
    delta: float
    weight: int  # the FedAvg weight sent in the train reply ("num-examples")


def planned_noise(node: StoreNode, cfg: RunConfig) -> float:
    """σ for this store: the configured one, or calibrated so that this run's planned rounds
    alone end at the run's ε target (the budget then caps the total over all runs)."""
    if cfg["noise-multiplier"] > 0:
        return cfg["noise-multiplier"]
    n = node.published_size()  # never the exact count
    q = sample_rate_for(n, cfg["batch-size"])
    steps = cfg["rounds"] * cfg["local-epochs"] * steps_per_epoch(n, cfg["batch-size"])
    return _calibrated(cfg["target-epsilon"], node.delta(cfg), q, steps, cfg["accountant"])


def dp_plan(node: StoreNode, cfg: RunConfig) -> DPPlan:
    """The round's mechanism at this store (raises DataError when it publishes no size)."""
    size, batch = node.published_size(), cfg["batch-size"]
    q = sample_rate_for(size, batch)
    return DPPlan(published_size=size, sample_rate=q, steps=cfg["local-epochs"] * steps_per_epoch(size, batch),
                  noise_multiplier=planned_noise(node, cfg), divisor=expected_batch(size, q),
                  delta=node.delta(cfg), weight=size)


_SIGMA_CACHE: dict[tuple, float] = {}


def _calibrated(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    key = (target, delta, q, steps, accountant)
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = privacy.calibrate_noise(target, delta, q, steps, accountant)
    return _SIGMA_CACHE[key]


def training_seed(node: StoreNode, cfg: RunConfig, server_round: int) -> int:
    """The seed of a round's sampling and noise.

    A deployed store draws it from the operating system: the noise and the Poisson batches
    must be unpredictable to the server, which knows the run config, or it could recreate
    the noise and subtract it. A simulation derives it from (seed, store, round), so that a
    run — and a resumed run — reproduces exactly; its randomness is public by construction,
    so a simulation demonstrates the accounting, it protects no one.
    """
    if not node.simulated:
        return secrets.randbits(62)
    return zlib.crc32(f"{cfg['seed']}|{node.store_id}|{server_round}".encode())


def spent_epsilon(node: StoreNode, cfg: RunConfig) -> float | None:
    """The store's ε over its whole ledger now (None when unbounded: a non-DP event)."""
    counted = ledger.read_ledger(node.paths.state_dir, node.store_id).counted()
    eps = privacy.epsilon(counted, node.delta(cfg), cfg["accountant"])
    return eps if math.isfinite(eps) else None


@dataclass(frozen=True)
class Declined:
    """The round would exceed the store's budget: nothing was trained. ``info`` is the
    decline reply's content (common.exchange.wire.decline_reason)."""

    info: dict


@dataclass(frozen=True)
class Trained:
    """A committed round: the trained model and the train reply's metrics (common.exchange.wire)."""

    model: Recommender
    metrics: dict
    loss: float  # not DP: it leaves only where the store allows local metrics
    accountant: str
    seed: int


def train_round(node: StoreNode, cfg: RunConfig, model: Recommender, *, run_id: str, server_round: int,
                proximal_mu: float = 0.0) -> Trained | Declined:
    """Plan, reserve, train ``model`` (the global model, changed in place) and commit one
    round at ``node``. ``cfg`` carries the store's settings (client.policy.store_settings).
    Raises LedgerError (a damaged ledger: nothing trains) or the training's own error."""
    accountant = cfg["accountant"]
    plan = dp_plan(node, cfg)  # from the published size only: the exact count stays here
    delta, budget = plan.delta, cfg["epsilon-budget"]
    ledger_dir = node.paths.state_dir
    sigma, q, steps = plan.noise_multiplier, plan.sample_rate, plan.steps

    def epsilon_of(history: list) -> float:
        return privacy.epsilon(history, delta, accountant)

    planned = PrivacyEvent(
        run_id=run_id, round=server_round, noise_multiplier=sigma, sample_rate=q,
        steps=steps, clip_norm=cfg["clip-norm"], accountant=accountant,
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"), delta=delta,
    )
    # The check and the reservation are one step under the store's lock; a bad ledger stops
    # here, loudly (LedgerError → a refusal).
    decision, reservation = ledger.reserve(
        ledger_dir, node.store_id, planned,
        lambda history, reserved, new: budget_decision(history, reserved, new, budget, epsilon_of), epsilon_of)
    if reservation is None:
        reason = (f"training this round would bring ε from {decision.spent:.3f} to {decision.after:.3f}, "
                  f"over the store's budget {budget:g}")
        return Declined({"store-id": node.store_id, "epsilon": decision.spent, "epsilon-after": decision.after,
                         "epsilon-budget": budget, "delta": delta, "accountant": accountant, "reason": reason})
    try:
        train_cfg = TrainConfig(
            local_epochs=cfg["local-epochs"], batch_size=cfg["batch-size"], lr=cfg["dp-lr"],
            optimizer=cfg["dp-optimizer"], seed=training_seed(node, cfg, server_round),
            proximal_mu=proximal_mu, dp_path=cfg["dp-path"],
            secure_noise=not node.simulated,  # deployed: ChaCha20 noise and sampling (common.privacy.secure_noise)
        )
        result = train_local(model, node.data, train_cfg, DPConfig(sigma, cfg["clip-norm"], plan.published_size))
    except BaseException as exc:
        # Nothing was built from this round's noise, so nothing leaves: give the budget back.
        try:
            ledger.release(ledger_dir, node.store_id, reservation.id,
                           f"training failed ({exc.__class__.__name__})", epsilon_of)
        except LedgerError as release_error:  # the reservation then stays counted as spent
            print(f"storefed: store {node.store_id}: {release_error}", file=sys.stderr, flush=True)
        raise
    event = replace(planned, steps=result.steps, at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # Durable before the update leaves: a crash from here on over-counts, never under-counts.
    committed = ledger.commit(ledger_dir, node.store_id, reservation.id, event, epsilon_of)
    metrics = {
        "num-examples": plan.weight,  # the published size, never the exact count
        # Everything the store counts as spent now (open reservations of other runs included).
        "epsilon": epsilon_of(committed.counted()),
        "delta": delta,
        "noise-multiplier": sigma,
        "rounds-trained": sum(1 for e in committed.events if e.run_id == run_id),
        "epsilon-budget": budget,
    }
    return Trained(model, metrics, result.loss, accountant, train_cfg.seed)
