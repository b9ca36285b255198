"""The secure noise source of deployed stores (common.privacy.secure_noise) and its use in DP-SGD.

Distribution checks use a fixed key, so they are deterministic; each threshold is a known
critical value at a false-alarm rate of at most 1e-3 for a correct sampler, so a wrong
scale, a biased uniform or a broken Box–Muller fails them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from common.learning import dp_fast
from common.learning.model import Recommender
from common.learning.training import DPConfig, TrainConfig, train_local
from common.privacy.secure_noise import SUMMED_NORMALS, SecureRandom

N = 200_000
KEY, NONCE = bytes(range(32)), bytes(16)
# Kolmogorov's limiting distribution: P(√n·D > 1.9495) = 0.001.
KS_CRITICAL_001 = 1.9495
# Standard normal quantile for a two-sided 0.1 %: |Z| > 3.29.
Z_001 = 3.2905


def _ks_statistic(z: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance of the sample from N(0, 1)."""
    z = np.sort(z)
    cdf = ndtr(z)
    n = len(z)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def _check_standard_normal(z: np.ndarray) -> None:
    n = len(z)
    assert abs(z.mean()) < Z_001 / math.sqrt(n)
    # Var of the sample variance of N(0,1) is 2/(n-1).
    assert abs(z.var(ddof=1) - 1.0) < Z_001 * math.sqrt(2.0 / (n - 1))
    assert _ks_statistic(z) < KS_CRITICAL_001 / math.sqrt(n)


def test_uniforms_are_on_the_open_unit_interval_and_uniform():
    u = SecureRandom(KEY, NONCE).uniform(N)
    assert u.dtype == np.float64 and u.min() > 0.0 and u.max() < 1.0
    # Uniform(0,1): mean 1/2, sd 1/√12.
    assert abs(u.mean() - 0.5) < Z_001 / math.sqrt(12 * N)
    u = np.sort(u)
    d = max((np.arange(1, N + 1) / N - u).max(), (u - np.arange(N) / N).max())
    assert d < KS_CRITICAL_001 / math.sqrt(N)


def test_box_muller_normals_are_standard_normal():
    _check_standard_normal(SecureRandom(KEY, NONCE).standard_normal(N))


def test_secure_gaussian_sums_four_normals_to_the_asked_std():
    std = 2.5
    z = SecureRandom(KEY, NONCE).gaussian(N, std)
    _check_standard_normal(z / std)
    assert SUMMED_NORMALS == 4  # Opacus' secure mode (2n normals, n = 2)


def test_a_wrong_scale_would_fail_the_checks():
    """The checks above can fail: a sum of four normals without the ½ is caught."""
    z = SecureRandom(KEY, NONCE).standard_normal(4 * N).reshape(4, N).sum(axis=0)
    with pytest.raises(AssertionError):
        _check_standard_normal(z)


def test_poisson_inclusion_frequency_matches_q():
    q = 0.07
    draws = SecureRandom(KEY, NONCE).bernoulli(N, q)
    assert abs(draws.mean() - q) < Z_001 * math.sqrt(q * (1 - q) / N)
    assert SecureRandom().bernoulli(1000, 0.0).sum() == 0 and SecureRandom().bernoulli(1000, 1.0).all()


def test_streams_from_the_os_differ_and_a_keyed_stream_replays():
    assert SecureRandom().keystream(64) != SecureRandom().keystream(64)
    assert not np.array_equal(SecureRandom().gaussian(16, 1.0), SecureRandom().gaussian(16, 1.0))
    assert SecureRandom(KEY, NONCE).keystream(64) == SecureRandom(KEY, NONCE).keystream(64)
    with pytest.raises(ValueError):
        SecureRandom(b"short", NONCE)
    with pytest.raises(ValueError):
        SecureRandom().gaussian(3, float("nan"))


def test_noisy_optimizer_adds_secure_noise_of_std_sigma_c_over_batch():
    layer = torch.nn.Linear(400, 100)
    sigma, clip, batch = 1.5, 0.8, 20
    opt = dp_fast.NoisyOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), sigma, clip, batch,
                                 generator=SecureRandom(KEY, NONCE))
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.add_noise()
    noise = torch.cat([p.grad.reshape(-1) for p in layer.parameters()]).double().numpy()
    _check_standard_normal(noise / (sigma * clip / batch))


def _check_poisson_batches(loader, n: int, q: float, steps: int) -> None:
    """Batches of a Poisson sampler: each member in each batch with probability q, independently.

    Each check has a false-alarm rate of at most 1e-3 for a correct sampler; a sampler that
    gives the same members every step, or deals members out in turn, fails them.
    """
    batches = [np.asarray(idx) for (idx,) in loader]
    assert len(batches) == len(loader) == steps
    member_of = np.zeros((steps, n), bool)
    for t, idx in enumerate(batches):
        assert idx.dtype == np.int64 and len(np.unique(idx)) == len(idx) and (idx >= 0).all() and (idx < n).all()
        member_of[t, idx] = True
    # Every batch's size is Binomial(n, q) (Bonferroni over the steps: |z| < 4.42 each).
    sizes = member_of.sum(axis=1)
    assert (np.abs(sizes - n * q) < 4.42 * math.sqrt(n * q * (1 - q))).all(), sizes
    # Every member's count over the steps is Binomial(steps, q): the chi-square of the counts
    # has mean n and variance n·(2 + (1 − 6q(1 − q)) / (steps·q(1 − q))).
    counts = member_of.sum(axis=0)
    pq = steps * q * (1 - q)
    chi2 = float(((counts - steps * q) ** 2).sum() / pq)
    assert abs(chi2 - n) < Z_001 * math.sqrt(n * (2 + (1 - 6 * q * (1 - q)) / pq)), chi2
    # Different steps pick different members: consecutive batches share Binomial(n, q²)
    # members each (summed over the pairs; neighbouring pairs covary by n·(q³ − q⁴)).
    shared = float((member_of[1:] & member_of[:-1]).sum())
    pairs = steps - 1
    var = n * (pairs * (q ** 2 - q ** 4) + 2 * (pairs - 1) * (q ** 3 - q ** 4))
    assert abs(shared - pairs * n * q * q) < Z_001 * math.sqrt(var), shared


def test_secure_poisson_batches_draw_each_member_at_rate_q_independently_per_step():
    from common.learning.training import PoissonBatches

    _check_poisson_batches(PoissonBatches(2000, 0.1, 200, SecureRandom(KEY, NONCE)), 2000, 0.1, 200)


def test_seeded_poisson_batches_draw_each_member_at_rate_q_independently_per_step():
    from common.learning.training import PoissonBatches

    _check_poisson_batches(PoissonBatches(2000, 0.1, 200, torch.Generator().manual_seed(0)), 2000, 0.1, 200)
    _check_poisson_batches(PoissonBatches(500, 0.5, 100, torch.Generator().manual_seed(1)), 500, 0.5, 100)


class _FixedBatches:
    """A broken sampler: the same n·q members at every step (right totals, no randomness)."""

    def __init__(self, n, q, steps):
        self.n, self.q, self.steps = n, q, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield (torch.arange(int(self.n * self.q)),)


class _DealtBatches(_FixedBatches):
    """Another: members dealt out in turn, each exactly steps·q times (too even)."""

    def __iter__(self):
        size = int(self.n * self.q)
        for t in range(self.steps):
            yield (torch.arange(t * size, (t + 1) * size) % self.n,)


@pytest.mark.parametrize("broken", [_FixedBatches, _DealtBatches])
def test_the_sampler_checks_can_fail(broken):
    with pytest.raises(AssertionError):
        _check_poisson_batches(broken(2000, 0.1, 200), 2000, 0.1, 200)


def test_training_with_secure_noise_is_not_replayable_and_seeded_training_is(small_store):
    def trained(secure: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = Recommender(small_store.items)
        cfg = TrainConfig(batch_size=64, lr=0.5, optimizer="sgd", seed=5, secure_noise=secure)
        train_local(model, small_store, cfg, DPConfig(noise_multiplier=1.0, clip_norm=1.0))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(trained(False), trained(False))
    assert not torch.equal(trained(True), trained(True))
    with pytest.raises(ValueError, match="bookkeeping"):
        train_local(Recommender(small_store.items), small_store,
                    TrainConfig(secure_noise=True, dp_path="opacus"), DPConfig(1.0))
