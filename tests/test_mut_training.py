"""The Poisson sampler of common.learning.training and the numbers that set it (q, steps, the
divisor), against hand-computed values and draws replayed from the same generator or key."""

from __future__ import annotations

import math

import numpy as np
import torch

from common.learning.training import PoissonBatches, expected_batch, sample_rate_for, steps_per_epoch
from common.privacy.secure_noise import SecureRandom

KEY, NONCE = bytes(range(32)), bytes(16)


def test_steps_rate_and_divisor_by_hand():
    assert [steps_per_epoch(n, 128) for n in (0, 1, 127, 128, 129, 256, 257, 1000)] == [1, 1, 1, 1, 2, 2, 3, 8]
    assert steps_per_epoch(-5, 10) == 1
    assert steps_per_epoch(10, 3) == 4
    assert sample_rate_for(1000, 128) == 1 / 8 and sample_rate_for(129, 128) == 0.5 and sample_rate_for(5, 128) == 1.0
    assert sample_rate_for(0, 128) == 1.0
    assert expected_batch(1000, 0.125) == 125
    assert expected_batch(1000, 1 / 3) == 333  # int(), not round()
    assert expected_batch(999, 2 / 3) == 666
    assert expected_batch(3, 0.1) == 1 and expected_batch(0, 0.5) == 1  # never below one


def test_seeded_batches_are_the_replayed_draws():
    loader = PoissonBatches(50, 0.3, 4, torch.Generator().manual_seed(11))
    assert len(loader) == 4 and (loader.n, loader.sample_rate, loader.steps) == (50, 0.3, 4)
    replay = torch.Generator().manual_seed(11)
    batches = [idx for (idx,) in loader]
    assert len(batches) == 4
    for idx in batches:
        u = torch.rand(50, generator=replay)
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert idx.tolist() == [i for i in range(50) if u[i] < 0.3]
    assert len({tuple(b.tolist()) for b in batches}) == 4  # a fresh draw at every step


def test_secure_batches_are_the_replayed_uniforms_below_q():
    loader = PoissonBatches(40, 0.25, 3, SecureRandom(KEY, NONCE))
    replay = SecureRandom(KEY, NONCE)
    batches = [idx for (idx,) in loader]
    assert len(batches) == 3
    for idx in batches:
        u = replay.uniform(40)
        assert idx.dtype == torch.int64
        assert idx.tolist() == [i for i in range(40) if u[i] < 0.25]
    assert len({tuple(b.tolist()) for b in batches}) == 3


def test_each_member_is_drawn_at_rate_q_independently_of_the_others():
    n, q, steps = 400, 0.1, 50
    counts = np.zeros(n)
    for (idx,) in PoissonBatches(n, q, steps, torch.Generator().manual_seed(5)):
        counts[idx.numpy()] += 1
    total = counts.sum()
    # Binomial(n·steps, q): mean 2000, sd 60; 4.5 sd either side
    assert abs(total - n * steps * q) < 4.5 * math.sqrt(n * steps * q * (1 - q))
    # every member is drawn (P(a member never drawn) = 0.9^50 ≈ 0.5 %) and none every time
    assert (counts > 0).mean() > 0.98 and counts.max() < steps
    assert [len(i) for (i,) in PoissonBatches(10, 0.0, 3, torch.Generator())] == [0, 0, 0]
    assert [len(i) for (i,) in PoissonBatches(10, 1.0, 2, SecureRandom(KEY, NONCE))] == [10, 10]
    assert list(PoissonBatches(10, 0.5, 0, torch.Generator())) == []


def test_one_member_at_batch_size_one_is_one_step():
    assert steps_per_epoch(1, 1) == 1 and steps_per_epoch(0, 1) == 1 and steps_per_epoch(2, 1) == 2
    assert sample_rate_for(1, 1) == 1.0
