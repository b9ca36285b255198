"""DP-SGD through Opacus on a real batch: clipping, noise scale, empty batches.

The reference is computed independently: one plain backward pass per member on a copy
of the model, each gradient clipped by hand.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from common.dataset import ExampleConfig, sample_train_examples
from common.model import BasketLoss, Recommender
from common.training import DPConfig, TrainConfig, batch_tensors, train_local


def _model(store, seed=0):
    torch.manual_seed(seed)
    return Recommender(store.items)


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _per_member_grads(model, store, seed):
    """Per-member gradients (rows) of the basket loss, one backward pass per member."""
    examples = sample_train_examples(store, np.random.default_rng(seed), ExampleConfig())
    loss_fn = BasketLoss()
    rows = []
    for n in range(len(examples)):
        model.zero_grad()
        *inputs, t_items, t_mask = batch_tensors(examples, [n])
        loss_fn(model(*inputs), t_items, t_mask).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_every_member_gradient_is_clipped_before_it_is_summed(small_store):
    clip = 0.05
    seed = 11
    model = _model(small_store)
    reference = copy.deepcopy(model)
    before = _flat_params(model)
    # q = 1 (batch larger than the store) makes the Poisson batch all members; σ = 0 and
    # SGD with lr = 1 make the update exactly −(sum of clipped gradients) / members.
    cfg = TrainConfig(batch_size=10**6, local_epochs=1, optimizer="sgd", lr=1.0, seed=seed)
    result = train_local(model, small_store, cfg, DPConfig(noise_multiplier=0.0, clip_norm=clip))
    assert result.steps == 1 and result.sample_rate == 1.0
    update = before - _flat_params(model)

    grads = _per_member_grads(reference, small_store, seed)
    norms = grads.norm(dim=1)
    assert (norms > clip).float().mean() > 0.9, "the test needs clipping to be active"
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = (grads * factors[:, None]).sum(dim=0) / small_store.n_train_members
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-7)
    # No member's contribution exceeds the clip norm.
    assert ((grads * factors[:, None]).norm(dim=1) <= clip * (1 + 1e-5)).all()


def test_noise_is_added_at_the_calibrated_scale(small_store):
    sigma, clip = 2.0, 0.05
    n = small_store.n_train_members

    def run(noise_seed, noise_multiplier=sigma):
        model = _model(small_store)
        cfg = TrainConfig(batch_size=10**6, optimizer="sgd", lr=1.0, seed=3, noise_seed=noise_seed)
        train_local(model, small_store, cfg, DPConfig(noise_multiplier=noise_multiplier, clip_norm=clip))
        return _flat_params(model)

    # Same seeds reproduce (up to float summation order across threads, ~1e-9, far
    # below the noise scale of ~5e-4 checked here).
    a, a_again, b = run(1), run(1), run(2)
    assert torch.allclose(a, a_again, rtol=0, atol=1e-7), "same seeds, same result"
    assert (a - b).abs().max() > 1e-4, "different noise seeds must differ"
    # Without noise the noise seed changes nothing: the difference above is the noise.
    assert torch.allclose(run(1, 0.0), run(2, 0.0), rtol=0, atol=1e-7)
    # a − b is the difference of two N(0, (σC/n)²) draws per coordinate.
    std = (a - b).std().item()
    assert std == pytest.approx(np.sqrt(2) * sigma * clip / n, rel=0.05)


def test_empty_poisson_batches_still_take_a_noise_step(small_store):
    model = _model(small_store)
    n = small_store.n_train_members
    # Expected batch of one member: about a third of the Poisson batches are empty.
    cfg = TrainConfig(batch_size=1, optimizer="sgd", lr=0.1, seed=5)
    result = train_local(model, small_store, cfg, DPConfig(noise_multiplier=1.0, clip_norm=1.0))
    assert result.steps == n
    assert torch.isfinite(_flat_params(model)).all()


def test_plain_training_lowers_the_loss(small_store):
    model = _model(small_store)
    cfg = TrainConfig(batch_size=64, local_epochs=1, seed=0)
    first = train_local(model, small_store, cfg, None).loss
    for epoch in range(1, 4):
        last = train_local(model, small_store, TrainConfig(batch_size=64, seed=epoch), None).loss
    assert last < first
