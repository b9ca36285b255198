"""DP-SGD on a real batch, both paths (one-pass book-keeping and Opacus ghost clipping):
clipping, noise scale, empty batches, and the two paths agreeing step for step.

The reference is computed independently: one plain backward pass per member on a copy
of the model, each gradient clipped by hand; per-layer norms against torch.func.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.dataset import ExampleConfig, sample_train_examples
from common.learning.model import BasketLoss, Recommender
from common.learning.training import DPConfig, TrainConfig, batch_tensors, train_local

DP_PATHS = ("bookkeeping", "opacus")


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


_REFERENCE: dict = {}


def _reference_grads(store, seed):
    """Per-member gradients at the initial model, computed once for both DP paths."""
    if seed not in _REFERENCE:
        _REFERENCE[seed] = _per_member_grads(_model(store), store, seed)
    return _REFERENCE[seed]


@pytest.mark.parametrize("dp_path", DP_PATHS)
def test_every_member_gradient_is_clipped_before_it_is_summed(small_store, dp_path):
    clip = 0.05
    seed = 11
    model = _model(small_store)
    before = _flat_params(model)
    # q = 1 (batch larger than the store) makes the Poisson batch all members; σ = 0 and
    # SGD with lr = 1 make the update exactly −(sum of clipped gradients) / members.
    cfg = TrainConfig(batch_size=10**6, local_epochs=1, optimizer="sgd", lr=1.0, seed=seed, dp_path=dp_path)
    result = train_local(model, small_store, cfg, DPConfig(noise_multiplier=0.0, clip_norm=clip))
    assert result.steps == 1 and result.sample_rate == 1.0
    update = before - _flat_params(model)

    grads = _reference_grads(small_store, seed)
    norms = grads.norm(dim=1)
    assert (norms > clip).float().mean() > 0.9, "the test needs clipping to be active"
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = (grads * factors[:, None]).sum(dim=0) / small_store.n_train_members
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-7)
    # No member's contribution exceeds the clip norm.
    assert ((grads * factors[:, None]).norm(dim=1) <= clip * (1 + 1e-5)).all()


@pytest.mark.parametrize("dp_path", DP_PATHS)
def test_noise_is_added_at_the_calibrated_scale(small_store, dp_path):
    sigma, clip = 2.0, 0.05
    n = small_store.n_train_members

    def run(noise_seed, noise_multiplier=sigma):
        model = _model(small_store)
        cfg = TrainConfig(batch_size=10**6, optimizer="sgd", lr=1.0, seed=3, noise_seed=noise_seed, dp_path=dp_path)
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


def test_empty_poisson_batches_still_take_a_noise_step(small_store, dp_path="bookkeeping"):
    # The default path; Opacus' own handling of empty batches is Opacus' (and slow to run).
    from common.learning.training import PoissonBatches, steps_per_epoch

    model = _model(small_store)
    n = small_store.n_train_members
    # Expected batch of one member: about a third of the Poisson batches are empty.
    cfg = TrainConfig(batch_size=1, optimizer="sgd", lr=0.1, seed=5, dp_path=dp_path)
    result = train_local(model, small_store, cfg, DPConfig(noise_multiplier=1.0, clip_norm=1.0))
    empty = sum(len(idx) == 0 for (idx,) in PoissonBatches(n, 1 / n, n, torch.Generator().manual_seed(5)))
    assert result.steps == n == steps_per_epoch(n, 1) and empty > n / 5
    assert torch.isfinite(_flat_params(model)).all()


def test_a_store_of_no_member_moves_by_the_noise_alone_at_scale_sigma_c_over_b(small_store):
    """Every Poisson batch empty: each step is w ← w − lr·N(0, (σC)²)/B, and nothing else."""
    import dataclasses

    from common.learning.training import expected_batch, sample_rate_for, steps_per_epoch

    sigma, clip, lr, published, batch = 1.3, 0.7, 0.5, 640, 128
    steps, divisor = steps_per_epoch(published, batch), expected_batch(published, sample_rate_for(published, batch))
    assert (steps, divisor) == (5, 128)  # ⌈640/128⌉ steps at q = 1/5; divisor ⌊640 · 1/5⌋
    # The small store with all of its members gone (same catalog, model and everything else).
    store = dataclasses.replace(small_store, member_ids=small_store.member_ids[:0])
    model = _model(small_store)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(batch_size=batch, optimizer="sgd", lr=lr, seed=5, noise_seed=17)
    result = train_local(model, store, cfg, DPConfig(noise_multiplier=sigma, clip_norm=clip, published_size=published))
    assert result.steps == steps and result.examples == 0 and result.loss == 0.0
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)]).double()
    # Independent of how the draws are ordered: every coordinate moved by the sum of `steps`
    # N(0, (lr·σC/B)²) draws, so by N(0, steps·(lr·σC/B)²); over ~5·10⁴ coordinates the sample
    # std is within 1.5 % and the mean within 4 standard errors.
    scale = lr * sigma * clip / divisor * np.sqrt(steps)
    assert moved.numel() > 40_000  # 49,078 here: the std of the sample std is 0.3 %
    assert moved.std().item() == pytest.approx(scale, rel=0.015)
    assert abs(moved.mean().item()) < 4 * scale / np.sqrt(moved.numel())
    # Exactly: the noise generator seeded with noise_seed, one N(0, σC) draw per parameter in
    # parameter order at each step, divided by B and stepped by SGD; no gradient, no decay.
    gen = torch.Generator().manual_seed(17)
    expected = [b.clone() for b in before]
    for _ in range(steps):
        for w in expected:
            w.add_(torch.normal(0.0, sigma * clip, size=w.shape, generator=gen) / divisor, alpha=-lr)
    for p, w in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dp_path", DP_PATHS)
def test_the_proximal_term_is_added_after_the_noise_unclipped(small_store, dp_path):
    """FedProx with DP: step t is w ← w − lr·((clipped sum + noise)/B + μ(w − w₀)). With q = 1
    (one step per epoch) and σ > 0: the prox term is 0 at step 1, so after two steps
    w₂(μ) = w₂(0) − lr·μ·(w₁ − w₀), with w₁ the weights after the first step."""
    mu, lr = 2.0, 1.0

    def run(epochs, proximal_mu):
        model = _model(small_store)
        cfg = TrainConfig(batch_size=10**6, local_epochs=epochs, optimizer="sgd", lr=lr, seed=3, noise_seed=4,
                          proximal_mu=proximal_mu, dp_path=dp_path)
        result = train_local(model, small_store, cfg, DPConfig(noise_multiplier=1.0, clip_norm=0.05))
        assert result.steps == epochs
        return _flat_params(model)

    w0, w1, w2, w2_prox = _flat_params(_model(small_store)), run(1, 0.0), run(2, 0.0), run(2, mu)
    assert (w1 - w0).abs().max() > 1e-4 and (w2_prox - w2).abs().max() > 1e-4, "the check needs movement"
    # Added after the noise and the division by B: not clipped with the members' gradients,
    # not divided by B (which would make it ~170× smaller), not left out.
    assert torch.allclose(w2_prox, w2 - lr * mu * (w1 - w0), rtol=0, atol=1e-6)


def test_plain_training_lowers_the_loss(small_store):
    model = _model(small_store)
    cfg = TrainConfig(batch_size=64, local_epochs=1, seed=0)
    first = train_local(model, small_store, cfg, None).loss
    for epoch in range(1, 4):
        last = train_local(model, small_store, TrainConfig(batch_size=64, seed=epoch), None).loss
    assert last < first


def test_one_pass_path_runs_the_same_mechanism_as_opacus(small_store):
    """Same seeds → same Poisson batches and same noise draws; the two arithmetics must then
    give the same model after a round of several noisy, clipped Adam steps."""
    def run(dp_path):
        model = _model(small_store)
        cfg = TrainConfig(batch_size=48, local_epochs=2, seed=7, dp_path=dp_path)
        result = train_local(model, small_store, cfg, DPConfig(noise_multiplier=1.3, clip_norm=0.1))
        return _flat_params(model), result

    fast, r_fast = run("bookkeeping")
    ref, r_ref = run("opacus")
    assert r_fast.steps == r_ref.steps > 4 and r_fast.sample_rate == r_ref.sample_rate
    assert r_fast.loss == pytest.approx(r_ref.loss, rel=1e-5)
    moved = (fast - _flat_params(_model(small_store))).abs().max()
    assert moved > 1e-3, "the round must move the model for the comparison to mean anything"
    assert torch.allclose(fast, ref, rtol=0, atol=1e-5)


class _SequenceNet(torch.nn.Module):
    """Two Linear layers on [B, T, ·] inputs: one small (materialised norms), one large
    (Gram-form norms), and one on 2-D input, as in the recommender."""

    def __init__(self):
        super().__init__()
        self.small = torch.nn.Linear(3, 1)  # 3·1 ≤ T² → per-member gradients materialised
        self.large = torch.nn.Linear(6, 5)  # 6·5 > T² → Gram form
        self.head = torch.nn.Linear(5, 4, bias=False)

    def forward(self, x, y):
        h = torch.tanh(self.large(x)).mean(dim=1)  # [B, 5]
        return self.head(h) + self.small(y).mean(dim=1)  # [B, 4]


def test_per_member_norms_and_clipped_sums_match_torch_func():
    from torch.func import functional_call, grad, vmap

    from common.learning import dp_fast

    torch.manual_seed(0)
    net = _SequenceNet()
    x, y, target = torch.randn(7, 4, 6), torch.randn(7, 4, 3), torch.randn(7, 4)
    tapped = dp_fast.TappedModule(net)
    per_member = ((tapped(x, y) - target) ** 2).sum(dim=1)
    clip = 8.0  # the members' norms here are 4–14
    loss = dp_fast.ClippedLoss(per_member, tapped, clip)
    loss.backward()

    # Independent reference: per-member gradients by vmap(grad), clipped and summed by hand.
    params = {k: v.detach() for k, v in net.named_parameters()}

    def one(p, xi, yi, ti):
        out = functional_call(net, p, (xi[None], yi[None]))
        return ((out - ti[None]) ** 2).sum()

    per = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, x, y, target)
    norms = torch.sqrt(sum(g.reshape(7, -1).pow(2).sum(1) for g in per.values()))
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any(), "both clipped and unclipped members"
    assert torch.allclose(loss.factors, factors, rtol=1e-5)
    for name, p in net.named_parameters():
        expected = (per[name] * factors.view(-1, *[1] * (per[name].dim() - 1))).sum(0)
        assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6), name


def test_one_pass_path_refuses_parameters_outside_linear_layers():
    from common.learning import dp_fast

    net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="0.weight"):
        dp_fast.TappedModule(net)
