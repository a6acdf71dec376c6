"""FedAvg over validated adapter updates, with FedProx as a client-side variant.

The server loop hands `FedAvg.aggregate` the global state it sent and the decoded site
updates; the strategy rejects updates that fail `validate_update`, refuses the round if
fewer than `min_fit_clients` remain, and returns the example-weighted average. With
FFA-LoRA (only B and the head travel) that average is exactly the average of the sites'
B·A products, since A is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from clients.task.errors import RoundFailed, UpdateRejected
from strategies.aggregate import weighted_average
from strategies.fedexp import weighted_spread
from strategies.validation import validate_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteUpdate:
    """One site's reply to a training round."""

    site: str
    state: Mapping[str, np.ndarray]
    num_examples: object
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """Why one site's update was left out of a round."""

    site: str
    check: str
    detail: str


@dataclass(frozen=True)
class RoundOutcome:
    state: dict[str, np.ndarray]
    accepted: list[SiteUpdate]
    rejected: list[Rejection]
    # Σ w_i ‖update_i - global‖² over the accepted updates (weights summing to 1), for
    # FedExP's step size; None where the server does not see single updates.
    spread: float | None = None


@dataclass(frozen=True)
class FedAvg:
    """Example-weighted FedAvg with server-side update validation.

    Attributes:
        max_norm: Largest L2 norm of (update - global) accepted from one site.
        min_fit_clients: Fewest valid updates a round needs.
    """

    max_norm: float = 1000.0
    min_fit_clients: int = 1
    # "examples": weight each update by its site's example count (McMahan et al. 2017);
    # "uniform": every accepted update weighs the same (client-level DP, `server.aggregate
    # = "sum"`, where the server optimiser scales the uniform mean back to the sum).
    weighting: str = "examples"

    def client_config(self) -> dict[str, float]:
        """Extra plan fields this strategy asks sites to train with."""
        return {}

    def aggregate(
        self, server_round: int, reference: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> RoundOutcome:
        """Validate updates and average the accepted ones.

        Raises:
            RoundFailed: If fewer than `min_fit_clients` updates pass validation.
        """
        accepted: list[SiteUpdate] = []
        rejected: list[Rejection] = []
        norms: list[float] = []
        for update in updates:
            try:
                norm = validate_update(
                    update.state,
                    reference=reference,
                    num_examples=update.num_examples,
                    max_norm=self.max_norm,
                )
            except UpdateRejected as exc:
                log.warning(
                    "round %d: rejected update from site %s (check=%s): %s",
                    server_round,
                    update.site,
                    exc.check,
                    exc.detail,
                )
                rejected.append(Rejection(update.site, exc.check, exc.detail))
                continue
            accepted.append(update)
            norms.append(norm)
        if len(accepted) < self.min_fit_clients:
            raise RoundFailed(
                f"round {server_round}: {len(accepted)} valid update(s), "
                f"min-fit-clients={self.min_fit_clients}"
            )
        weights = (
            [1] * len(accepted)
            if self.weighting == "uniform"
            else [int(u.num_examples) for u in accepted]  # type: ignore[call-overload]
        )
        state = weighted_average([u.state for u in accepted], weights)
        spread = weighted_spread([n * n for n in norms], weights)
        return RoundOutcome(state=state, accepted=accepted, rejected=rejected, spread=spread)


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg whose sites add (mu/2)·||w - w_global||² to their local loss."""

    proximal_mu: float = 0.01

    def client_config(self) -> dict[str, float]:
        return {"proximal_mu": self.proximal_mu}
