"""Local training of the recommender at one store: plain, or DP-SGD with Opacus.

DP-SGD (``dp`` given): Opacus' mechanism with Poisson sampling of members (sample rate
q = batch_size / published size), per-member clipping to ``clip_norm``, Gaussian noise
``noise_multiplier × clip_norm`` on the sum, divided by the expected batch; one-pass
book-keeping (:mod:`common.learning.dp_fast`) or Opacus' ghost clipping. One example per
member per epoch, so one member's whole influence on a step is bounded by the clip.
q, the steps and the divisor come from the store's *published* size
(:mod:`common.privacy.published_size`), never from its exact member count, so that they
are the same for a store and its add/remove neighbour.

The privacy *accounting* is not done here: the function reports the mechanism it ran
(σ, q, steps) and the caller records it (see :mod:`common.privacy.accountant`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.data.dataset import ExampleConfig, Examples, StoreData, concat_examples, sample_train_examples
from common.learning.model import BasketLoss, Recommender
# The sampling of DP-SGD (q, steps, divisor) is part of the mechanism the accountant prices.
from common.privacy.accountant import expected_batch, sample_rate_for, steps_per_epoch

if TYPE_CHECKING:
    from common.privacy.secure_noise import SecureRandom


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 128  # expected batch size under Poisson sampling
    lr: float = 0.01
    seed: int = 0
    optimizer: str = "adam"  # or "sgd" (plain steps; used to check DP-SGD's arithmetic)
    noise_seed: int | None = None  # None: derived from seed
    proximal_mu: float = 0.0  # FedProx: pull towards the round's global weights
    dp_path: str = "bookkeeping"  # DP-SGD arithmetic: "bookkeeping" (common.learning.dp_fast) or "opacus" (ghost clipping)
    # Poisson batches and noise from a ChaCha20 stream keyed by os.urandom (deployed stores;
    # common.privacy.secure_noise), not from the seeded torch generators (simulation, replayable).
    secure_noise: bool = False
    # Layers left as they are (not trained, no noise drawn for them): run config dp-train
    # (common.config.RunConfig.frozen_layers, DESIGN §5.3). Fewer noised dimensions.
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float
    clip_norm: float = 1.0
    # The store's published size, which sets q, the steps and the divisor. 0: the exact
    # member count (tests and benchmarks on bare data only; a store always passes its own).
    published_size: int = 0


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's steps (not DP; stays local by default)
    steps: int
    examples: int  # members with at least one receipt before the cut
    sample_rate: float
    noise_multiplier: float  # 0.0 for plain training
    clip_norm: float


class PoissonBatches:
    """``steps`` Poisson batches of member indices: each of ``n`` members in each batch with
    probability ``sample_rate``, independently (Opacus' ``UniformWithReplacementSampler``,
    same draws from the same generator). The step count is given, not derived from ``n``."""

    def __init__(self, n: int, sample_rate: float, steps: int, generator: "torch.Generator | SecureRandom") -> None:
        self.n, self.sample_rate, self.steps, self.generator = n, sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            if isinstance(self.generator, torch.Generator):
                yield (torch.nonzero(torch.rand(self.n, generator=self.generator) < self.sample_rate).reshape(-1),)
            else:  # a deployed store's ChaCha20 stream (common.privacy.secure_noise)
                drawn = self.generator.poisson_batch(self.n, self.sample_rate).astype(np.int64)
                yield (torch.from_numpy(drawn),)


def batch_tensors(ex: Examples, idx: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Model inputs and targets for the members ``idx`` of ``ex``."""
    idx = np.asarray(idx, dtype=np.int64)
    return (
        torch.from_numpy(ex.hist_items[idx]),
        torch.from_numpy(ex.hist_feat[idx]),
        torch.from_numpy(ex.hist_mask[idx]),
        torch.from_numpy(ex.profile[idx]),
        torch.from_numpy(ex.target_items[idx]),
        torch.from_numpy(ex.target_mask[idx]),
    )


@torch.no_grad()
def predict(model: Recommender, ex: Examples, batch: int = 512) -> np.ndarray:
    """Model scores of every catalog item for each member (row) of ``ex``, [N, n_items]."""
    model.eval()
    model.refresh_item_snapshot()
    out = np.empty((len(ex), model.n_items), dtype=np.float32)
    for start in range(0, len(ex), batch):
        idx = np.arange(start, min(start + batch, len(ex)))
        *inputs, _, _ = batch_tensors(ex, idx)
        out[idx] = model(*inputs).numpy()
    return out


def train_local(
    model: Recommender,
    data: StoreData,
    cfg: TrainConfig,
    dp: DPConfig | None,
    example_cfg: ExampleConfig | None = None,
) -> TrainResult:
    """Train ``model`` in place on the store's members for ``cfg.local_epochs`` epochs
    (``cfg.frozen`` layers excepted: they keep their values)."""
    frozen = [getattr(model, name) for name in cfg.frozen]  # AttributeError: not a layer of the model
    for layer in frozen:
        layer.requires_grad_(False)
    try:
        return _train_local(model, data, cfg, dp, example_cfg)
    finally:
        for layer in frozen:  # the model object is reused for the next round and for serving
            layer.requires_grad_(True)


def _train_local(model: Recommender, data: StoreData, cfg: TrainConfig, dp: DPConfig | None,
                 example_cfg: ExampleConfig | None) -> TrainResult:
    n = data.n_train_members
    published = (dp.published_size or n) if dp is not None else n
    q = sample_rate_for(published, cfg.batch_size)
    if n == 0 and dp is None:
        return TrainResult(0.0, 0, 0, q, 0.0, 0.0)
    # With DP, a store with no member to train still takes every (noise-only) step: the
    # update must not tell a store of none from a store of one.
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    model.refresh_item_snapshot()
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer '{cfg.optimizer}'; use adam or sgd")
    opt_class = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_class([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    criterion = BasketLoss()
    if dp is not None and cfg.dp_path not in ("bookkeeping", "opacus"):
        raise ValueError(f"unknown dp path '{cfg.dp_path}'; use bookkeeping or opacus")
    # The loader yields member indices; features are gathered per batch from the epoch's examples.
    shuffled = DataLoader(TensorDataset(torch.arange(n)), batch_size=cfg.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(cfg.seed)) if n else None
    loader = shuffled
    if dp is not None:
        # Poisson batches at q for the published size's steps; nothing here reads n but the draw.
        loader = PoissonBatches(n, q, steps_per_epoch(published, cfg.batch_size), torch.Generator().manual_seed(cfg.seed))
        divisor = expected_batch(published, q)
    noise_generator = torch.Generator().manual_seed(cfg.noise_seed if cfg.noise_seed is not None else cfg.seed + 1)
    if dp is not None and cfg.secure_noise:
        if cfg.dp_path != "bookkeeping":
            # Opacus' own secure mode needs torchcsprng, which no longer builds with torch 2.
            raise ValueError(f"dp path '{cfg.dp_path}' has no secure noise source here; "
                             "a deployed store trains with dp-path = \"bookkeeping\"")
        from common.privacy.secure_noise import SecureRandom

        # One stream for both: the Poisson batches and the noise (DESIGN §4: unpredictable
        # to the server, which knows every seed of the run config).
        noise_generator = SecureRandom()
        loader = PoissonBatches(n, q, steps_per_epoch(published, cfg.batch_size), noise_generator)
    if dp is not None and (cfg.dp_path == "bookkeeping" or n == 0):  # Opacus cannot wrap an empty loader
        from common.learning import dp_fast  # the same mechanism in one backward pass (see its docstring)

        model, optimizer, criterion = dp_fast.make_private(
            model, optimizer, criterion, noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm,
            expected_batch_size=divisor, noise_generator=noise_generator)
    elif dp is not None:
        # Opacus' path has no per-member guard against a model that makes one member's
        # gradient non-finite (dp_fast has): a deployed store refuses it (store_policy.refusals),
        # so it runs only in simulations and benchmarks, on models of storefed's own making.
        from opacus import PrivacyEngine  # imported lazily: plain training does not need it

        # Opacus' own accountant is not used: the store's ledger is the record (common.privacy.accountant).
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off: the noise is seeded so runs can be replayed.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv", secure_mode=False)
            # Opacus would derive q and the divisor from the loader's exact length: it gets the
            # plain loader, and the Poisson batches and the divisor are set from the published size.
            model, optimizer, criterion, _ = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=shuffled,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.clip_norm,
                poisson_sampling=False,
                grad_sample_mode="ghost",
                criterion=criterion,
                noise_generator=noise_generator,
            )
            optimizer.expected_batch_size = divisor
    if cfg.proximal_mu > 0:
        _add_proximal_term(optimizer, model, cfg.proximal_mu)
    losses: list[float] = []
    steps = 0
    try:
        with warnings.catch_warnings():
            # Opacus warns on every step that its hooks see no input gradients; harmless here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _epoch in range(cfg.local_epochs):
                examples = sample_train_examples(data, rng, example_cfg) if n else None
                for (idx,) in loader:
                    steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    if len(idx) == 0:
                        # An empty Poisson batch still takes a (noise-only) step, as DP-SGD must.
                        if dp is not None:
                            _noise_only_step(optimizer)
                        continue
                    *inputs, t_items, t_mask = batch_tensors(examples, idx.numpy())
                    loss = criterion(model(*inputs), t_items, t_mask)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
    finally:
        if dp is not None:
            model.remove_hooks()  # removes Opacus' hooks so the next round can wrap the model again
    return TrainResult(
        loss=float(np.mean(losses)) if losses else 0.0,
        steps=steps,
        examples=n,
        sample_rate=q,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        clip_norm=dp.clip_norm if dp else 0.0,
    )


def train_pooled(model: Recommender, stores: list[StoreData], cfg: TrainConfig,
                 on_epoch: Callable[[int, Recommender], bool] | None = None) -> TrainResult:
    """Train ``model`` in place on all stores' members pooled, without DP (no privacy).

    The centralized reference of the quality benchmark (DESIGN §6): what the model reaches
    if every store's data were in one place. Each epoch draws one example per member per
    store, as federated training does, and shuffles them together. ``on_epoch(epoch,
    model)`` runs after each epoch (1-based); returning True stops training (early stopping).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    model.refresh_item_snapshot()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    criterion = BasketLoss()
    losses: list[float] = []
    n = sum(d.n_train_members for d in stores)
    for _epoch in range(cfg.local_epochs):
        examples = concat_examples([sample_train_examples(d, rng) for d in stores if d.n_train_members])
        order = rng.permutation(len(examples))
        for start in range(0, len(order), cfg.batch_size):
            *inputs, t_items, t_mask = batch_tensors(examples, order[start:start + cfg.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(*inputs), t_items, t_mask)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if on_epoch is not None and on_epoch(_epoch + 1, model):
            break
        model.train()
        # Federated rounds refresh the encoder's item snapshot from each round's global model;
        # pooled epochs must too, or the encoder reads the initial random vectors all along
        # while evaluation reads the trained ones (the old centralized reference's weakness).
        model.refresh_item_snapshot()
    return TrainResult(loss=float(np.mean(losses)) if losses else 0.0, steps=len(losses), examples=n,
                       sample_rate=0.0, noise_multiplier=0.0, clip_norm=0.0)


def _add_proximal_term(optimizer, model, mu: float) -> None:
    """FedProx: add μ·(w − w_global) to each gradient just before the parameter update.

    The hook sits on the inner optimizer, after Opacus has clipped and noised the member
    gradients; the term depends only on the weights, not on member data, so it costs no
    privacy and is not clipped.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    inner = getattr(optimizer, "original_optimizer", optimizer)

    def pre_step(_opt, _args, _kwargs):
        for p, p0 in zip(params, anchor):
            if p.grad is not None:
                p.grad.add_(p.detach() - p0, alpha=mu)

    inner.register_step_pre_hook(pre_step)


def _noise_only_step(optimizer) -> None:
    """An empty Poisson batch: the clipped sum is zero, but DP-SGD still adds the noise.

    Zero gradients go through Opacus' own step (accumulate, add noise, scale, update).
    """
    for p in optimizer.params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
