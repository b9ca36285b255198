"""common.privacy.secure_noise value by value: the keystream against the cipher called here,
uniforms, Box–Muller and the four-normal sum recomputed in plain Python from the same bytes,
the re-keying point and every refusal (kills the mutants the distribution tests leave alive)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from common.privacy import secure_noise
from common.privacy.secure_noise import SecureRandom

KEY, NONCE = bytes(range(32)), bytes(4) + bytes(range(100, 112))


def _chacha(key, nonce, n):
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(n))


def _uniforms(raw: bytes):
    return [((w >> 11) + 0.5) * 2.0 ** -53 for w in struct.unpack(f"<{len(raw) // 8}Q", raw)]


def test_the_keystream_is_chacha20_of_zeros_and_continues():
    s = SecureRandom(KEY, NONCE)
    expected = _chacha(KEY, NONCE, 100)
    assert s.keystream(30) + s.keystream(0) + s.keystream(70) == expected
    assert s._used == 100


def test_uniforms_are_the_top_53_bits_plus_a_half():
    s = SecureRandom(KEY, NONCE)
    u = s.uniform(6)
    assert u.dtype == np.float64 and u.tolist() == _uniforms(_chacha(KEY, NONCE, 48))
    assert s.uniform(0).shape == (0,)


def test_uniform_extremes_stay_inside_the_open_interval(monkeypatch):
    s = SecureRandom(KEY, NONCE)
    # the smallest word, and the largest whose k + ½ is exact in float64 (k < 2^52; above it the
    # half is rounded away, and the very largest word gives exactly 1.0: see the mutation report)
    top = ((1 << 52) - 1) << 11
    monkeypatch.setattr(s, "keystream", lambda n: bytes(8) + struct.pack("<Q", top))
    u = s.uniform(2)
    assert u.tolist() == [0.5 * 2.0 ** -53, (2.0 ** 52 - 0.5) * 2.0 ** -53]
    assert 0.0 < u[0] and u[1] < 0.5


def test_box_muller_by_hand_for_an_odd_count():
    u = _uniforms(_chacha(KEY, NONCE, 8 * 6))  # 5 normals need 3 pairs
    r = [math.sqrt(-2.0 * math.log(x)) for x in u[:3]]
    a = [2.0 * math.pi * x for x in u[3:]]
    expected = [r[i] * math.cos(a[i]) for i in range(3)] + [r[i] * math.sin(a[i]) for i in range(2)]
    z = SecureRandom(KEY, NONCE).standard_normal(5)
    assert z.shape == (5,) and np.allclose(z, expected, rtol=1e-12, atol=1e-15)
    z6 = SecureRandom(KEY, NONCE).standard_normal(6)
    assert np.allclose(z6[:5], expected, rtol=1e-12) and math.isclose(z6[5], r[2] * math.sin(a[2]), rel_tol=1e-12)


def test_gaussian_is_half_the_sum_of_four_normals_times_std():
    std = 0.7
    z = SecureRandom(KEY, NONCE).standard_normal(4 * 3).reshape(4, 3)
    expected = z.sum(axis=0) * 0.5 * std
    got = SecureRandom(KEY, NONCE).gaussian(3, std)
    assert np.allclose(got, expected, rtol=1e-14, atol=0)
    assert SecureRandom(KEY, NONCE).gaussian(3, 0.0).tolist() == [0.0, 0.0, 0.0]
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError) as err:
            SecureRandom(KEY, NONCE).gaussian(3, bad)
        assert str(err.value) == f"std must be finite and ≥ 0, got {bad}"


def test_bernoulli_and_poisson_batches_are_the_uniforms_below_p():
    u = np.array(_uniforms(_chacha(KEY, NONCE, 8 * 20)))
    p = float(np.sort(u)[7])  # exactly 7 uniforms are below it
    drawn = SecureRandom(KEY, NONCE).bernoulli(20, p)
    assert drawn.tolist() == (u < p).tolist() and drawn.sum() == 7
    assert SecureRandom(KEY, NONCE).poisson_batch(20, p).tolist() == np.flatnonzero(u < p).tolist()
    assert SecureRandom(KEY, NONCE).bernoulli(5, 0.0).tolist() == [False] * 5
    assert SecureRandom(KEY, NONCE).bernoulli(5, 1.0).tolist() == [True] * 5
    for bad in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError) as err:
            SecureRandom(KEY, NONCE).bernoulli(3, bad)
        assert str(err.value) == f"p must be in [0, 1], got {bad}"


def test_wrong_key_or_nonce_sizes_and_negative_lengths_are_refused():
    for key, nonce in ((bytes(31), NONCE), (KEY, bytes(15)), (bytes(33), bytes(16))):
        with pytest.raises(ValueError) as err:
            SecureRandom(key, nonce)
        assert str(err.value) == "ChaCha20 needs a 32-byte key and a 16-byte nonce"
    with pytest.raises(ValueError) as err:
        SecureRandom(KEY, NONCE).keystream(-1)
    assert str(err.value) == "n_bytes must be ≥ 0"


def test_an_os_keyed_stream_rekeys_before_its_limit_and_a_fixed_key_never(monkeypatch):
    draws = []

    def fake_urandom(n):
        draws.append(n)
        return bytes([len(draws)]) * n

    monkeypatch.setattr(secure_noise.os, "urandom", fake_urandom)
    monkeypatch.setattr(secure_noise, "REKEY_BYTES", 64)
    s = SecureRandom()
    assert draws == [32, 12]  # a 32-byte key, then the 12 random bytes of the nonce
    key1, nonce1 = bytes([1]) * 32, bytes(4) + bytes([2]) * 12
    assert s.keystream(40) == _chacha(key1, nonce1, 40)
    assert s.keystream(24) == _chacha(key1, nonce1, 64)[40:]  # exactly at the limit: same stream
    assert len(draws) == 2
    key2, nonce2 = bytes([3]) * 32, bytes(4) + bytes([4]) * 12
    assert s.keystream(8) == _chacha(key2, nonce2, 8)  # over it: a fresh key and nonce
    assert len(draws) == 4 and s._used == 8
    fixed = SecureRandom(KEY, NONCE)
    assert fixed.keystream(100) == _chacha(KEY, NONCE, 100)
    assert len(draws) == 4
    keyed = SecureRandom(KEY)  # a key with an OS nonce: still never re-keyed
    assert len(draws) == 5 and keyed.keystream(80) == _chacha(KEY, bytes(4) + bytes([5]) * 12, 80)
    assert len(draws) == 5
