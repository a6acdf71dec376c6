"""SecAgg+ settings and the precision they give (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead").

Flower's SecAgg+ (server/secagg.py drives it) has each site scale its update by
``w / max_weight``, clip every coordinate to ``[-clipping_range, clipping_range]``,
quantize it stochastically to integers in ``[0, quantization_range)``, add pairwise and
private masks modulo 2³² and send the result; the server learns only the sum and divides
by the summed weights. Sites in fedlora send their clipped update (``local - global``),
whose coordinates are bounded by its L2 norm, so a clipping range no smaller than the
site-side clip norm never clips a coordinate. What a secure request and its reply carry
is part of the wire contract (strategies/protocol.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from clients.task.errors import ConfigError

MODULUS_RANGE = 2**32  # Flower's default mask modulus; must stay below 2**32
# Mask generators, by `secagg.prg` value: what each expands a mask seed with.
PRGS = {
    "aes-ctr": "aes-256-ctr",  # fedlora's: the full key, hashed to an AES-256 key, in CTR mode
    "flower": "numpy-mt19937-32bit-seed",  # Flower 1.41's own (README, "Security")
}


@dataclass(frozen=True)
class SecAggSettings:
    """Validated SecAgg+ parameters (fields named after the ``secagg.*`` run-config keys).

    Attributes:
        num_shares: Shares each site's secrets are split into (its neighbourhood size);
            odd, as SecAgg+ builds neighbourhoods of ``num_shares // 2`` on each side.
        reconstruction_threshold: Shares needed to rebuild a dropped site's masks; the
            round survives as long as every neighbourhood keeps this many live sites.
        clipping_range: Per-coordinate bound before quantization.
        quantization_range: Integer levels per coordinate.
        max_weight: Largest aggregation weight a site may report.
    """

    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    max_weight: int = 10_000
    prg: str = "aes-ctr"

    def __post_init__(self) -> None:
        if self.prg not in PRGS:
            raise ConfigError(f"secagg.prg={self.prg!r} must be one of {', '.join(PRGS)}")
        if self.num_shares < 3 or self.num_shares % 2 == 0:
            raise ConfigError(f"secagg.num-shares={self.num_shares!r} must be odd and >= 3")
        if not 2 <= self.reconstruction_threshold < self.num_shares:
            raise ConfigError(
                f"secagg.reconstruction-threshold={self.reconstruction_threshold!r} must be "
                f">= 2 and < secagg.num-shares={self.num_shares!r}"
            )
        if not 0 < self.clipping_range < math.inf:
            raise ConfigError(
                f"secagg.clipping-range={self.clipping_range!r} must be finite and > 0"
            )
        if not 2 <= self.quantization_range < MODULUS_RANGE // 2:
            raise ConfigError(
                f"secagg.quantization-range={self.quantization_range!r} must be in "
                f"[2, {MODULUS_RANGE // 2})"
            )
        if self.max_weight < 1:
            raise ConfigError(f"secagg.max-weight={self.max_weight!r} must be >= 1")

    def max_sites(self) -> int:
        """Most sites whose masked sum cannot wrap around the modulus."""
        return MODULUS_RANGE // self.quantization_range - 1

    def check_sites(self, sampled: int) -> str | None:
        """Why a round with ``sampled`` sites cannot run SecAgg+, or None if it can."""
        if sampled < self.num_shares:
            return f"{sampled} sampled site(s) < secagg.num-shares={self.num_shares}"
        if sampled > self.max_sites():
            return (
                f"{sampled} sampled sites would overflow the 2^32 modulus with "
                f"secagg.quantization-range={self.quantization_range}"
            )
        return None

    def check_mean(self, delta: Mapping[str, np.ndarray], weights: Sequence[float]) -> str | None:
        """Why a secure mean update cannot come from sites that ran the protocol, or None.

        Each honest site scales its update by ``w / max_weight ≤ 1`` and clips every
        coordinate to ``±clipping_range`` before masking, so every coordinate of the
        weighted mean lies within ``±clipping_range`` (plus `error_bound`). A site that
        bypasses its mod can add any value modulo the field, to its update and to the
        weight slot the server divides by; a mean outside that range shows it did.
        """
        bound = self.clipping_range + self.error_bound([max(float(w), 1.0) for w in weights])
        largest = max((float(np.max(np.abs(v), initial=0.0)) for v in delta.values()), default=0.0)
        if not largest <= bound:  # NaN fails too
            return (
                f"a coordinate of the secure mean is {largest:.4g}, outside "
                f"±secagg.clipping-range={self.clipping_range} (+ rounding "
                f"{bound - self.clipping_range:.2g}): a site did not follow the protocol"
            )
        return None

    def error_bound(self, weights: list[float]) -> float:
        """Worst-case per-coordinate error of the secure weighted mean vs the exact one.

        Each site's stochastic rounding moves its scaled coordinate by less than one
        level, ``2·clipping_range / quantization_range``; the sum of ``m`` sites moves by
        less than ``m`` levels and is divided by the summed scaled weights. Rounding each
        scaled weight ``w_i / max_weight`` to a level changes it by a relative error below
        ``1 / (2·quantization_range·w_i / max_weight)``, which moves a mean of values in
        ``±clipping_range`` by at most ``2·clipping_range`` times that error.
        """
        level = 2 * self.clipping_range / self.quantization_range
        scaled = [w / self.max_weight for w in weights]
        rounding = len(weights) * level / sum(scaled)
        weight_rel = 1 / (2 * self.quantization_range * min(scaled))
        return rounding + 2 * self.clipping_range * weight_rel


def aes_ctr_masks(
    seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """Mask arrays uniform in ``[0, num_range)`` from a cryptographic generator.

    A drop-in for Flower's ``pseudo_rand_gen(seed, num_range, dimensions_list)``: the
    whole seed (a pairwise ECDH-derived key or a site's 32-byte private seed) is hashed to
    an AES-256 key whose CTR keystream gives one little-endian uint32 per element; each
    key masks one vector per round, so the fixed nonce is never reused with a key.
    ``num_range`` is a power of two no larger than 2**32, so the reduction stays uniform.
    """
    if num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"num_range={num_range} must be a power of two <= 2**32")
    key = hashlib.sha256(b"fedlora-secagg-mask\x00" + seed).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    sizes = [math.prod(d) for d in dimensions_list]
    stream = np.frombuffer(encryptor.update(bytes(4 * sum(sizes))), dtype="<u4")
    values = stream.astype(np.int64) % num_range
    out, start = [], 0
    for dims, size in zip(dimensions_list, sizes, strict=True):
        out.append(values[start : start + size].reshape(dims))
        start += size
    return out


@contextlib.contextmanager
def mask_generator(flower_module: ModuleType, prg: str) -> Iterator[None]:
    """Make a Flower SecAgg+ module expand masks with ``prg`` for the duration.

    Flower's site mod and server workflow call a module-level ``pseudo_rand_gen``; it is
    not a parameter of either, so the function is swapped in the module and restored.
    """
    if prg == "flower":
        yield
        return
    original = flower_module.pseudo_rand_gen
    flower_module.pseudo_rand_gen = aes_ctr_masks
    try:
        yield
    finally:
        flower_module.pseudo_rand_gen = original


def compact_masked(blobs: Sequence[bytes]) -> list[bytes]:
    """Re-encode masked vectors (int64, values in ``[0, 2**32)``) as uint32: half the bytes.

    Flower's `secaggplus_mod` ships masked vectors as int64 although every entry is
    reduced modulo at most 2**32; the server expands them back (`expand_masked`) before
    the workflow sums them, so the protocol is unchanged.
    """
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    out = []
    for blob in blobs:
        arr = bytes_to_ndarray(blob)
        if arr.dtype != np.int64 or (arr.size and (arr.min() < 0 or arr.max() >= 2**32)):
            raise ValueError("a masked vector is not int64 in [0, 2**32)")
        out.append(ndarray_to_bytes(arr.astype(np.uint32)))
    return out


def expand_masked(blobs: Sequence[bytes]) -> list[bytes]:
    """Undo `compact_masked` (int64 again); int64 vectors pass unchanged."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    out = []
    for blob in blobs:
        arr = bytes_to_ndarray(blob)
        out.append(ndarray_to_bytes(arr.astype(np.int64)) if arr.dtype == np.uint32 else blob)
    return out
