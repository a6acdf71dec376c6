"""Client-level central differential privacy: clipping and Gaussian noise (DP-FedAvg).

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): every site clips its update ``delta = local - global`` to L2 norm ``C`` before
it leaves the site (clients/site/mods.py), so one site changes the *sum* of updates by at
most ``C``; the server adds ``N(0, (z·C)²)`` to that sum and divides by the number of
updates ``m``, i.e. noise of std ``z·C/m`` on the uniform mean. Sites are weighted
uniformly: an example-count weight would let one site move the mean by more than ``C/m``
and break the sensitivity bound.

`DifferentiallyPrivate` is the one place the mechanism meets aggregation: it wraps any
`Strategy`, in plain rounds (the server sees each update) and in SecAgg+ rounds (it sees
only their mean, which under DP is uniform because every site reports weight 1).

The sensitivity bound ``C`` must hold for what is averaged, not for what honest sites
send: in a plain round the server clips every accepted update to ``C`` itself before the
mean, so a site that skipped its clip mod moves the mean by at most ``C/m`` like any
other. In a secure round the server cannot see single updates. There each site's own
clip mod bounds its update before masking (the mod order is pinned in
clients/site/mods.py), which is all an honest site's privacy needs: its own contribution
is what the noise hides. A site that bypasses its mod is bounded only by what SecAgg+
itself bounds: every honest coordinate lies within ``±clipping_range`` and so does every
coordinate of their weighted mean, and the server refuses a secure mean outside that
range (`strategies.secagg.SecAggSettings.check_mean`), so such a site can push a
coordinate of the mean at most to ``±clipping_range`` (``C`` under DP) rather than by
``C/m`` in L2 (README, "Security").

The noise is secret: `SecureRandom` (the OS CSPRNG) by default; tests may inject a seeded
numpy `Generator`.

Pure numpy; the accountant that turns ``(z, sampling rate, rounds)`` into ``(ε, δ)`` lives
in server/privacy.py (it uses Opacus' RDP analysis).

Usage::

    clipped, norm = clip_update(delta, clip_norm=1.0)                      # at the site
    dp = ClientLevelDP(clip_norm=1.0, noise_multiplier=1.1)
    outcome = DifferentiallyPrivate(FedAvg(), dp, rng).aggregate(r, ref, updates)
    outcome = DifferentiallyPrivate(FedAvg(), dp, rng).aggregate_mean(r, ref, mean)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from clients.task.errors import ConfigError
from clients.task.secure_random import SecureRandom
from strategies.aggregate import contribution_shares, weighted_average
from strategies.strategy import MeanUpdate, RoundOutcome, SiteUpdate, State, Strategy

log = logging.getLogger(__name__)


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors together, in float64."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values()))
    )


def clip_update(
    delta: Mapping[str, np.ndarray], *, clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip_norm``.

    Returns:
        The clipped tensors (input dtypes) and the norm before clipping.
    """
    norm = global_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {k: (v.astype(np.float64) * scale).astype(v.dtype) for k, v in delta.items()}
    return clipped, norm


class NormalSource(Protocol):
    """What the mechanism needs of a generator: numpy's ``Generator.normal``."""

    def normal(self, loc: float, scale: float, size: tuple[int, ...]) -> np.ndarray: ...


def add_gaussian_noise(
    tensors: Mapping[str, np.ndarray], *, std: float, rng: NormalSource
) -> dict[str, np.ndarray]:
    """Add i.i.d. ``N(0, std²)`` to every coordinate (drawn in float64)."""
    return {
        k: (v.astype(np.float64) + rng.normal(0.0, std, size=v.shape)).astype(v.dtype)
        for k, v in tensors.items()
    }


@dataclass(frozen=True)
class ClientLevelDP:
    """The parameters of the Gaussian mechanism on the sum of clipped site updates.

    Attributes:
        clip_norm: ``C``, the L2 bound every site applies to its update.
        noise_multiplier: ``z``; the noise on the sum has std ``z·C``.
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        # An infinite C or z makes the noise infinite: a model of inf/NaN, not a guarantee.
        if not 0 < self.clip_norm < math.inf:
            raise ConfigError(f"dp.clip-norm={self.clip_norm!r} must be > 0 and finite")
        if not 0 <= self.noise_multiplier < math.inf:
            raise ConfigError(
                f"dp.noise-multiplier={self.noise_multiplier!r} must be >= 0 and finite"
            )

    def mean_noise_std(self, num_updates: int) -> float:
        """Std of the noise on the uniform mean of ``num_updates`` clipped updates."""
        return self.noise_multiplier * self.clip_norm / num_updates

    def privatize_mean(
        self,
        reference: Mapping[str, np.ndarray],
        mean: Mapping[str, np.ndarray],
        *,
        num_updates: int,
        rng: NormalSource,
    ) -> dict[str, np.ndarray]:
        """Add the mechanism's noise to the mean update and return the new global state."""
        delta = {k: mean[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference}
        noisy = add_gaussian_noise(delta, std=self.mean_noise_std(num_updates), rng=rng)
        return {
            k: (reference[k].astype(np.float64) + noisy[k]).astype(reference[k].dtype)
            for k in reference
        }


@dataclass(frozen=True)
class DifferentiallyPrivate:
    """Wraps a strategy: its judgement of the round, then the clipped mean plus noise.

    In a plain round the inner strategy judges the updates, the server clips each
    accepted one to ``C`` and adds noise of std ``z·C/m`` to their uniform mean. ``rng``
    must be unpredictable to every other party: the OS CSPRNG unless a test injects one.
    """

    inner: Strategy
    dp: ClientLevelDP
    rng: NormalSource = field(default_factory=SecureRandom)

    def client_config(self) -> dict[str, float]:
        return self.inner.client_config()

    def aggregate(
        self, server_round: int, reference: State, updates: Sequence[SiteUpdate]
    ) -> RoundOutcome:
        """Judge through the inner strategy, clip each accepted update to ``C``, then
        average uniformly and add noise.

        Raises:
            RoundFailed: From the inner strategy.
        """
        outcome = self.inner.aggregate(server_round, reference, updates)
        clipped = [self._clipped(server_round, reference, u) for u in outcome.accepted]
        uniform = [1.0] * len(clipped)
        shares = contribution_shares(clipped, uniform, reference=reference)
        outcome = replace(
            outcome,
            shares={u.site: s for u, s in zip(outcome.accepted, shares, strict=True)},
        )
        return self._privatize(reference, weighted_average(clipped, uniform), outcome)

    def _clipped(self, server_round: int, reference: State, update: SiteUpdate) -> State:
        """The site's local tensors with ``local - global`` clipped to ``C`` (float64)."""
        delta = {
            k: update.state[k].astype(np.float64) - ref.astype(np.float64)
            for k, ref in reference.items()
        }
        clipped, norm = clip_update(delta, clip_norm=self.dp.clip_norm)
        # Honest sites clipped already; float32 rounding of local = global + delta
        # leaves their norm within a hair of C.
        if norm > self.dp.clip_norm * (1 + 1e-3):
            log.warning(
                "round %d: site %s sent an update of norm %.4g > dp.clip-norm=%s; clipped",
                server_round,
                update.site,
                norm,
                self.dp.clip_norm,
            )
        return {k: ref.astype(np.float64) + clipped[k] for k, ref in reference.items()}

    def aggregate_mean(self, server_round: int, reference: State, mean: MeanUpdate) -> RoundOutcome:
        """Judge through the inner strategy, then add noise to the (uniform) secure mean.

        Raises:
            RoundFailed: From the inner strategy.
        """
        outcome = self.inner.aggregate_mean(server_round, reference, mean)
        averaged = {k: ref.astype(np.float64) + mean.delta[k] for k, ref in reference.items()}
        return self._privatize(reference, averaged, outcome)

    def _privatize(
        self, reference: State, mean: Mapping[str, np.ndarray], outcome: RoundOutcome
    ) -> RoundOutcome:
        state = self.dp.privatize_mean(
            reference, mean, num_updates=len(outcome.accepted), rng=self.rng
        )
        return replace(outcome, state=state)
