"""Randomness no other party may predict: DP noise, from the operating system's CSPRNG.

Differential privacy holds only while the noise is secret: whoever can regenerate a noise
tensor subtracts it and sees the clipped gradient (or update) in the clear. So the
Gaussian noise of DP-SGD at a site (clients/task/dpsgd.py) and of client-level DP at the
server (strategies/dp.py) comes from `SecureRandom`, never from a run seed, a round or a
site id, which the other side knows.

`SecureRandom` is AES-256 in counter mode keyed with 32 bytes from `os.urandom` and
started at a random 128-bit counter (the construction of NIST SP 800-90A's CTR_DRBG,
without reseeding): a cryptographic generator seeded by the OS, and faster than reading
`os.urandom` for every tensor. Each instance draws its own key, so a new instance per
round (or per run) shares nothing with any other.

Gaussian samples are Box–Muller pairs (Box and Muller 1958) over 53-bit uniforms in
float64. Like Opacus' ``secure_mode``, every sample is the sum of four draws divided by
two (same variance), which Holohan and Braghin 2021 ("Secure Random Sampling in
Differential Privacy", arXiv:2107.10138, §5.1) show defeats the floating-point attack on
Gaussian noise (Jin et al. 2022, arXiv:2112.05307) that a single draw is open to.

Opacus' own ``PrivacyEngine(secure_mode=True)`` needs ``torchcsprng``, whose last release
(0.2.1, March 2021) was built for torch 1.8 and has no build for torch 2.13; Opacus 1.6
skips its own secure-mode tests for that reason. Hence this module.

Usage::

    noise = SecureRandom().normal(0.0, sigma, size=(rank, hidden))  # float64
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# Draws summed into one Gaussian sample (Holohan and Braghin 2021 use 2n with n = 2).
DRAWS_PER_SAMPLE = 4


class SecureRandom:
    """Uniform and Gaussian samples from AES-256-CTR keyed by `os.urandom`."""

    def __init__(self) -> None:
        cipher = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16)))
        self._stream = cipher.encryptor()

    def _words(self, n: int) -> np.ndarray:
        """``n`` uniform uint64 words of keystream."""
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")

    def random(self, n: int) -> np.ndarray:
        """``n`` uniforms in (0, 1), float64 with 53 random bits each (never 0)."""
        return ((self._words(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def standard_normal(self, n: int) -> np.ndarray:
        """``n`` independent N(0, 1) samples (Box–Muller; both outputs of a pair used)."""
        pairs = (n + 1) // 2
        u = self.random(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = 2.0 * math.pi * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] = ()
    ) -> np.ndarray:
        """N(loc, scale²) samples of shape ``size``, float64; numpy's `Generator.normal`
        signature, so the server's mechanism takes either (tests inject a seeded one)."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        n = math.prod(shape)
        draws = self.standard_normal(DRAWS_PER_SAMPLE * n).reshape(DRAWS_PER_SAMPLE, n)
        samples = draws.sum(axis=0) / math.sqrt(DRAWS_PER_SAMPLE)
        return (loc + scale * samples).reshape(shape)


def os_seed() -> int:
    """A 63-bit seed from `os.urandom`, for a generator whose output only orders data.

    A DP-SGD site's batch order (clients/site/app.py) must be unknown to the server but
    is never released: torch's generator (MT19937) seeded with 63 fresh bits a round is
    enough there. Noise, which is released, always comes from `SecureRandom`.
    """
    return int.from_bytes(os.urandom(8), "big") >> 1
