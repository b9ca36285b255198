"""DP-SGD's randomness from a cryptographically secure stream (deployed stores).

torch's default generator (Mersenne Twister / Philox) is fast and seedable, which a
simulation wants, but it is predictable from its state, and the textbook float
Gaussian leaks through its floating-point representation (Mironov 2012; Jin et al. 2021,
"Are we there yet? Timing and floating-point attacks on differential privacy systems").
At a deployed store both the Poisson sample and the noise come from here instead:

* **Stream.** A ChaCha20 keystream (``cryptography``, i.e. OpenSSL), keyed and nonced from
  ``os.urandom``; re-keyed from ``os.urandom`` every :data:`REKEY_BYTES` so the 32-bit
  block counter never wraps.
* **Uniforms.** 64 keystream bits → the top 53 → ``(k + ½)·2⁻⁵³``: every value of the
  53-bit grid in the open interval (0, 1), so ``log(u)`` is always finite.
* **Normals.** Box–Muller on pairs of those uniforms, in float64, vectorised (numpy, and
  torch for the sine and cosine).
* **The floating-point mitigation** of Opacus' ``secure_mode``: each noise coordinate is the
  sum of four independent normals, scaled by ½ (variance 4·¼ = 1), so the low bits of one
  Box–Muller output no longer identify it (Jin et al. §5.1, n = 2).
* **Poisson sampling.** A member is in a batch when its uniform is below q.

Pure: numpy, torch's float64 sin/cos and the cipher, no files (the optimizer glue is
common.learning.dp_fast).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
NONCE_BYTES = 16  # cryptography's ChaCha20 nonce: 4-byte little-endian block counter + 12-byte nonce
# 2^30 bytes is 2^24 64-byte blocks: far below the 2^32 blocks a 32-bit counter allows.
REKEY_BYTES = 1 << 30
# Normals summed per noise coordinate (Opacus' secure mode: 2n with n = 2) and their scale.
SUMMED_NORMALS = 4
_SUM_SCALE = 1.0 / math.sqrt(SUMMED_NORMALS)
_TWO_TO_MINUS_53 = 2.0 ** -53


class SecureRandom:
    """Uniforms, normals and Bernoulli draws from a ChaCha20 keystream.

    ``key``/``nonce`` default to ``os.urandom``; pass them only in tests, to replay a stream.
    A stream built with a key never re-keys from the OS (so it stays replayable).
    """

    def __init__(self, key: bytes | None = None, nonce: bytes | None = None) -> None:
        self._fixed = key is not None
        self._rekey(key, nonce)

    def _rekey(self, key: bytes | None = None, nonce: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if key is None else key
        if nonce is None:
            # Counter starts at 0; the 12-byte nonce proper is random.
            nonce = bytes(4) + os.urandom(NONCE_BYTES - 4)
        if len(key) != KEY_BYTES or len(nonce) != NONCE_BYTES:
            raise ValueError(f"ChaCha20 needs a {KEY_BYTES}-byte key and a {NONCE_BYTES}-byte nonce")
        self._encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._used = 0

    def keystream(self, n_bytes: int) -> bytes:
        """The next ``n_bytes`` of the keystream (ChaCha20 of zero bytes)."""
        if n_bytes < 0:
            raise ValueError("n_bytes must be ≥ 0")
        if not self._fixed and self._used + n_bytes > REKEY_BYTES:
            self._rekey()
        self._used += n_bytes
        return self._encryptor.update(bytes(n_bytes))

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms on the 53-bit grid of the open interval (0, 1)."""
        words = np.frombuffer(self.keystream(8 * n), dtype="<u8")
        u = (words >> np.uint64(11)).astype(np.float64)
        u += 0.5  # in place: a noise draw is tens of MB at a large catalog
        u *= _TWO_TO_MINUS_53
        return u

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` independent N(0, 1) draws (Box–Muller, float64)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = torch.from_numpy(np.sqrt(-2.0 * np.log(u[:pairs])))
        # torch's float64 sin/cos are vectorised and ~10× numpy's here; same float64 values to rounding.
        angle = torch.from_numpy((2.0 * math.pi) * u[pairs:])
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)]).numpy()[:n]

    def gaussian(self, n: int, std: float) -> np.ndarray:
        """``n`` draws of N(0, std²), each the scaled sum of :data:`SUMMED_NORMALS` normals
        (Opacus' secure-mode mitigation of floating-point attacks)."""
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be finite and ≥ 0, got {std}")
        summed = self.standard_normal(SUMMED_NORMALS * n).reshape(SUMMED_NORMALS, n).sum(axis=0)
        return summed * (_SUM_SCALE * std)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """``n`` independent booleans, each True with probability ``p`` (to 2⁻⁵³)."""
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"p must be in [0, 1], got {p}")
        return self.uniform(n) < p

    def poisson_batch(self, n: int, q: float) -> np.ndarray:
        """Indices of a Poisson sample of ``range(n)``: each index independently with rate q."""
        return np.flatnonzero(self.bernoulli(n, q))
