"""Local training of the recommender at one store: plain, or DP-SGD with Opacus.

DP-SGD (``dp`` given): Opacus ``PrivacyEngine.make_private`` with Poisson sampling of
members (sample rate q = batch_size / members), per-member clipping to ``clip_norm`` and
Gaussian noise ``noise_multiplier × clip_norm``, using ghost clipping (per-sample norms
without materialising per-sample gradients). One example per member per epoch, so one
member's whole influence on a step is bounded by the clip.

The privacy *accounting* is not done here: the function reports the mechanism it ran
(σ, q, steps) and the caller records it (see :mod:`common.privacy.accountant`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.data.dataset import ExampleConfig, Examples, StoreData, concat_examples, sample_train_examples
from common.learning.model import BasketLoss, Recommender


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


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float
    clip_norm: float = 1.0


@dataclass
class TrainResult:
    loss: float  # mean training loss over the round's steps (not DP; stays local by default)
    steps: int
    examples: int  # members with at least one receipt before the cut
    sample_rate: float
    noise_multiplier: float  # 0.0 for plain training
    clip_norm: float


def steps_per_epoch(n_members: int, batch_size: int) -> int:
    """Steps in one epoch: ⌈members / batch_size⌉, the length of the plain loader."""
    return max(1, math.ceil(max(n_members, 1) / batch_size))


def sample_rate_for(n_members: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus uses: 1 / steps per epoch (≤ batch_size / members)."""
    return 1.0 / steps_per_epoch(n_members, batch_size)


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


def train_local(
    model: Recommender,
    data: StoreData,
    cfg: TrainConfig,
    dp: DPConfig | None,
    example_cfg: ExampleConfig | None = None,
) -> TrainResult:
    """Train ``model`` in place on the store's members for ``cfg.local_epochs`` epochs."""
    n = data.n_train_members
    q = sample_rate_for(n, cfg.batch_size)
    if n == 0:
        return TrainResult(0.0, 0, 0, q, dp.noise_multiplier if dp else 0.0, dp.clip_norm if dp else 0.0)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    model.refresh_item_snapshot()
    if cfg.optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer '{cfg.optimizer}'; use adam or sgd")
    opt_class = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_class(model.parameters(), lr=cfg.lr)
    criterion = BasketLoss()
    # The loader yields member indices; features are gathered per batch from the epoch's examples.
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if dp is not None and cfg.dp_path not in ("bookkeeping", "opacus"):
        raise ValueError(f"unknown dp path '{cfg.dp_path}'; use bookkeeping or opacus")
    noise_generator = torch.Generator().manual_seed(cfg.noise_seed if cfg.noise_seed is not None else cfg.seed + 1)
    if dp is not None and cfg.dp_path == "bookkeeping":
        from common.learning import dp_fast  # the same mechanism in one backward pass (see its docstring)

        model, optimizer, criterion, loader = dp_fast.make_private(
            model, optimizer, criterion, loader, noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm, noise_generator=noise_generator)
    elif dp is not None:
        from opacus import PrivacyEngine  # imported lazily: plain training does not need it

        # Opacus' own accountant is not used: the store's ledger is the record (common.privacy.accountant).
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off: the noise is seeded so runs can be replayed.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv", secure_mode=False)
            model, optimizer, criterion, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.clip_norm,
                poisson_sampling=True,
                grad_sample_mode="ghost",
                criterion=criterion,
                noise_generator=noise_generator,
            )
    if dp is not None:
        # The ledger records the mechanism that ran: it must be Opacus' own sample rate.
        if not math.isclose(loader.sample_rate, q, rel_tol=1e-12):
            raise AssertionError(f"Opacus samples at {loader.sample_rate}, planned {q}")
    if cfg.proximal_mu > 0:
        _add_proximal_term(optimizer, model, cfg.proximal_mu)
    losses: list[float] = []
    steps = 0
    try:
        with warnings.catch_warnings():
            # Opacus warns on every step that its hooks see no input gradients; harmless here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _epoch in range(cfg.local_epochs):
                examples = sample_train_examples(data, rng, example_cfg)
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


def train_pooled(model: Recommender, stores: list[StoreData], cfg: TrainConfig) -> TrainResult:
    """Train ``model`` in place on all stores' members pooled, without DP (no privacy).

    The centralized reference of the quality benchmark (DESIGN §6): what the model reaches
    if every store's data were in one place. Each epoch draws one example per member per
    store, as federated training does, and shuffles them together.
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
