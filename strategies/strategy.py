"""The `Strategy` protocol: what the round loop (server/loop.py) needs from a strategy.

Shaped after Flower's message-API strategies (``configure_train`` / ``aggregate_train``),
reduced to what fedlora's loop calls. Each round the loop sends `Strategy.client_config`
with the round plan, collects the sites' replies and hands them to the strategy:

- `Strategy.aggregate` gets every decoded update of a plain round and may judge each
  one (validate, reject, weigh);
- `Strategy.aggregate_mean` gets what SecAgg+ reveals instead (Bell et al. 2020): the
  weighted mean of the sites' updates and who contributed, never a single update.

Both return a `RoundOutcome`: the new global tensors before the server optimiser's step,
and which sites were accepted or rejected. A strategy adds behaviour by *wrapping*
another (strategies/dp.py adds client-level DP noise to both paths); a wrapper that needs
single updates (robust weighting, server-side clipping) cannot work on a mean and must
raise `clients.task.errors.ConfigError` from `aggregate_mean`, which run settings should
refuse before round 1. Pure numpy; no Flower types (strategies/protocol.py decodes the
wire into these).

Usage::

    strategy: Strategy = DifferentiallyPrivate(FedAvg(min_fit_clients=2), dp)
    outcome = strategy.aggregate(server_round, global_state, updates)
    outcome = strategy.aggregate_mean(server_round, global_state, MeanUpdate(delta, sites))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# Adapter tensors by parameter name, e.g. {"...lora_B.weight": (rank, out) float32}.
State = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """One site's reply to a training round.

    Attributes:
        site: The site id the reply names.
        state: The site's local tensors after training (empty under SecAgg+, where the
            server never sees them).
        num_examples: The example count the site claims, as received (validated before
            it becomes a weight).
        metrics: The reply's numeric metrics (strategies/protocol.py names them).
    """

    site: str
    state: State
    num_examples: object
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MeanUpdate:
    """What a secure round reveals to the server.

    Attributes:
        delta: The weighted mean of the sites' updates (``local - global``), float64.
        sites: The sites whose masked updates were summed, with empty ``state``.
    """

    delta: State
    sites: Sequence[SiteUpdate]


@dataclass(frozen=True)
class Rejection:
    """Why one site's update was left out of a round."""

    site: str
    check: str
    detail: str


@dataclass(frozen=True)
class RoundOutcome:
    """The aggregate of one round and the sites it used.

    ``shares`` gives each accepted site's share of the round's movement as aggregated,
    ``p_i·‖Δ_i‖ / Σ_j p_j·‖Δ_j‖`` with ``p`` the normalised weights the strategy used
    (`strategies.aggregate.contribution_shares`); empty when single updates are unseen.
    """

    state: dict[str, np.ndarray]
    accepted: list[SiteUpdate]
    rejected: list[Rejection]
    # Σ w_i ‖update_i - global‖² over the accepted updates (weights summing to 1), for
    # FedExP's step size (strategies/fedexp.py); None where the server sees no single update.
    spread: float | None = None
    shares: dict[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """A server-side aggregation rule, as the round loop uses it."""

    def client_config(self) -> dict[str, float]:
        """Extra round-plan fields this strategy asks the sites to train with."""
        ...

    def aggregate(
        self, server_round: int, reference: State, updates: Sequence[SiteUpdate]
    ) -> RoundOutcome:
        """Judge and combine the single updates of a plain round.

        Raises:
            RoundFailed: If too few updates can be used.
        """
        ...

    def aggregate_mean(self, server_round: int, reference: State, mean: MeanUpdate) -> RoundOutcome:
        """Turn the mean update of a secure round into the new global state.

        Raises:
            RoundFailed: If too few sites contributed or the mean is unusable.
        """
        ...
