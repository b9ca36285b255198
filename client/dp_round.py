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

import numpy as np

from client import explore_release
from client.state import ledger
from client.store_policy import PolicyError
from client.store import StoreNode
from common.config import MAX_NOISE_MULTIPLIER, RunConfig
from common.learning.model import Recommender
from common.learning.training import DPConfig, TrainConfig, train_local
from common.privacy import accountant as privacy
from common.privacy.accountant import expected_batch, sample_rate_for, steps_per_epoch
from common.privacy.ledger import LedgerError, PrivacyEvent, budget_decision
from common.privacy.secure_noise import SecureRandom


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


def release_noise(node: StoreNode, cfg: RunConfig) -> float:
    """σ of the run's explore release (DESIGN §5.3): calibrated so that the release alone costs
    ``explore-prior-share`` of the run's ε target; 0.0 when the run asks for none."""
    share = float(cfg["explore-prior-share"])
    if share <= 0:
        return 0.0
    try:
        return _calibrated(share * cfg["target-epsilon"], node.delta(cfg), 1.0, 1, cfg["accountant"])
    except ValueError:  # that ε needs σ > MAX_NOISE_MULTIPLIER: the release would be noise; none is made
        return 0.0


def planned_noise(node: StoreNode, cfg: RunConfig) -> float:
    """σ for this store: the configured one, or calibrated so that this run's explore release
    and planned rounds together end at the run's ε target (the budget then caps the total
    over all runs)."""
    if cfg["noise-multiplier"] > 0:
        return cfg["noise-multiplier"]
    n = node.published_size()  # never the exact count
    q = sample_rate_for(n, cfg["batch-size"])
    steps = cfg["rounds"] * cfg["local-epochs"] * steps_per_epoch(n, cfg["batch-size"])
    sigma_r = release_noise(node, cfg)
    prior = ((sigma_r, 1.0, 1),) if sigma_r > 0 else ()
    return _calibrated(cfg["target-epsilon"], node.delta(cfg), q, steps, cfg["accountant"], prior)


def dp_plan(node: StoreNode, cfg: RunConfig) -> DPPlan:
    """The round's mechanism at this store (raises DataError when it publishes no size)."""
    size, batch = node.published_size(), cfg["batch-size"]
    q = sample_rate_for(size, batch)
    return DPPlan(published_size=size, sample_rate=q, steps=cfg["local-epochs"] * steps_per_epoch(size, batch),
                  noise_multiplier=planned_noise(node, cfg), divisor=expected_batch(size, q),
                  delta=node.delta(cfg), weight=size)


_SIGMA_CACHE: dict[tuple, float] = {}


def _calibrated(target: float, delta: float, q: float, steps: int, accountant: str,
                prior: tuple = ()) -> float:
    key = (target, delta, q, steps, accountant, prior)
    if key not in _SIGMA_CACHE:
        _SIGMA_CACHE[key] = privacy.calibrate_noise(target, delta, q, steps, accountant, prior=list(prior))
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
            frozen=cfg.frozen_layers(),
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
        "rounds-trained": sum(1 for e in committed.events if e.run_id == run_id and e.round > 0),
        "epsilon-budget": budget,
    }
    return Trained(model, metrics, result.loss, accountant, train_cfg.seed)


# --- the run's one explore release (DESIGN §5.3)

RELEASE_ROUND = 0  # the ledger records the release as round 0 of its run: before round 1


@dataclass(frozen=True)
class Released:
    """A committed release: the noised vector and the reply's metrics (common.exchange.wire)."""

    vector: np.ndarray
    metrics: dict


def release_round(node: StoreNode, cfg: RunConfig, *, run_id: str) -> Released | Declined:
    """Reserve, compute and commit the store's explore release for ``run_id``: the per-member
    unit vectors of :mod:`client.explore_release` summed, plus N(0, σ_r²) per value.

    A run releases at most once (PolicyError: a refusal, nothing spent). Without DP (reference
    runs only) the exact sum is released and nothing is accounted."""
    if float(cfg["explore-prior-share"]) <= 0:
        raise PolicyError("the run asks for no explore release (explore-prior-share is 0)")
    if cfg["dp"] and release_noise(node, cfg) <= 0:
        raise PolicyError(f"an explore release at ε {cfg['explore-prior-share'] * cfg['target-epsilon']:g} would need "
                          f"more noise than σ {MAX_NOISE_MULTIPLIER:g}: none is made (raise explore-prior-share "
                          "or target-epsilon)")
    if not cfg["dp"]:
        return Released(explore_release.member_sum(node.data.train_log, node.data.items),
                        {"epsilon": float("inf"), "delta": 0.0, "noise-multiplier": 0.0, "epsilon-budget": float("inf")})
    accountant, delta, budget = cfg["accountant"], node.delta(cfg), cfg["epsilon-budget"]
    ledger_dir = node.paths.state_dir
    if any(e.run_id == run_id and e.round == RELEASE_ROUND
           for e in ledger.read_ledger(ledger_dir, node.store_id).events):
        raise PolicyError(f"this run ({run_id}) has had the store's explore release already; a store releases once per run")
    sigma = release_noise(node, cfg)

    def epsilon_of(history: list) -> float:
        return privacy.epsilon(history, delta, accountant)

    planned = PrivacyEvent(run_id=run_id, round=RELEASE_ROUND, noise_multiplier=sigma, sample_rate=1.0, steps=1,
                           clip_norm=1.0,  # the per-member vector's norm: the sensitivity
                           accountant=accountant, at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           delta=delta)
    decision, reservation = ledger.reserve(
        ledger_dir, node.store_id, planned,
        lambda history, reserved, new: budget_decision(history, reserved, new, budget, epsilon_of), epsilon_of)
    if reservation is None:
        reason = (f"the explore release would bring ε from {decision.spent:.3f} to {decision.after:.3f}, "
                  f"over the store's budget {budget:g}")
        return Declined({"store-id": node.store_id, "epsilon": decision.spent, "epsilon-after": decision.after,
                         "epsilon-budget": budget, "delta": delta, "accountant": accountant, "reason": reason})
    try:
        if node.simulated:  # replayable, like the simulation's DP-SGD noise (see training_seed)
            gaussian = np.random.default_rng(training_seed(node, cfg, RELEASE_ROUND)).normal
            vector = explore_release.noised_release(node.data.train_log, node.data.items, sigma,
                                                    lambda n, std: gaussian(0.0, std, n))
        else:
            vector = explore_release.noised_release(node.data.train_log, node.data.items, sigma,
                                                    SecureRandom().gaussian)
    except BaseException as exc:
        try:
            ledger.release(ledger_dir, node.store_id, reservation.id,
                           f"explore release failed ({exc.__class__.__name__})", epsilon_of)
        except LedgerError as release_error:
            print(f"storefed: store {node.store_id}: {release_error}", file=sys.stderr, flush=True)
        raise
    committed = ledger.commit(ledger_dir, node.store_id, reservation.id, planned, epsilon_of)
    return Released(vector, {"epsilon": epsilon_of(committed.counted()), "delta": delta,
                             "noise-multiplier": sigma, "epsilon-budget": budget})
