"""SecAgg+ settings and the precision they give (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead").

Flower's SecAgg+ (server/secagg.py drives it) has each site scale its update by
``w / max_weight``, clip every coordinate to ``[-clipping_range, clipping_range]``,
quantize it stochastically to integers in ``[0, quantization_range)``, add pairwise and
private masks modulo 2³² and send the result; the server learns only the sum and divides
by the summed weights. Sites in fedlora send their clipped update (``local - global``),
whose coordinates are bounded by its L2 norm, so a clipping range no smaller than the
site-side clip norm never clips a coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.task.errors import ConfigError

MODULUS_RANGE = 2**32  # Flower's default mask modulus; must stay below 2**32
# Config entries a secure training request carries beside the round plan: the names of
# the tensors in the legacy (ordered, unnamed) parameter list, and the largest weight.
NAMES_KEY = "secagg-tensor-names"
MAX_WEIGHT_KEY = "secagg-max-weight"
# What Flower 1.41's SecAgg+ expands mask seeds with (README, "Security").
PRG = "numpy-mt19937-32bit-seed"


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

    def __post_init__(self) -> None:
        if self.num_shares < 3 or self.num_shares % 2 == 0:
            raise ConfigError(f"secagg.num-shares={self.num_shares!r} must be odd and >= 3")
        if not 2 <= self.reconstruction_threshold < self.num_shares:
            raise ConfigError(
                f"secagg.reconstruction-threshold={self.reconstruction_threshold!r} must be "
                f">= 2 and < secagg.num-shares={self.num_shares!r}"
            )
        if not self.clipping_range > 0:
            raise ConfigError(f"secagg.clipping-range={self.clipping_range!r} must be > 0")
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
