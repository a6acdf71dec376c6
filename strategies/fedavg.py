"""FedAvg over validated adapter updates, with FedProx as a client-side variant.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): the new global tensors are the example-weighted average of the
sites' local tensors. In a plain round `FedAvg.aggregate` rejects updates that fail
`validate_update`, refuses the round if fewer than `min_fit_clients` remain, and returns
the weighted average. Under SecAgg+ the sites weighted and clipped their own updates and
the server learns only their mean, so `FedAvg.aggregate_mean` can check just how many
sites contributed and that the mean is finite. With FFA-LoRA (only B and the head travel)
the average is exactly the average of the sites' B·A products, since A is shared.

FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks") aggregates
like FedAvg; its sites add a proximal term to their local loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strategies.aggregate import contribution_shares, weighted_average
from strategies.errors import RoundFailed, UpdateRejected
from strategies.fedexp import weighted_spread
from strategies.strategy import MeanUpdate, Rejection, RoundOutcome, SiteUpdate, State
from strategies.validation import validate_update

log = logging.getLogger(__name__)


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
    # "uniform": every accepted update weighs the same (client-level DP, `uniform-mean`, and
    # `server.aggregate` sum modes, where the server optimiser scales the mean to a sum).
    weighting: str = "examples"

    def client_config(self) -> dict[str, float]:
        """Extra plan fields this strategy asks sites to train with."""
        return {}

    def aggregate(
        self, server_round: int, reference: State, updates: Sequence[SiteUpdate]
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
        self._require(server_round, len(accepted), "valid update(s)")
        weights = (
            [1] * len(accepted)
            if self.weighting == "uniform"
            else [int(u.num_examples) for u in accepted]  # type: ignore[call-overload]
        )
        states = [u.state for u in accepted]
        shares = contribution_shares(states, weights, reference=reference)
        return RoundOutcome(
            state=weighted_average(states, weights),
            accepted=accepted,
            rejected=rejected,
            spread=weighted_spread([n * n for n in norms], weights),
            shares={u.site: share for u, share in zip(accepted, shares, strict=True)},
        )

    def aggregate_mean(self, server_round: int, reference: State, mean: MeanUpdate) -> RoundOutcome:
        """The global state plus the secure mean update, in the global tensors' dtypes.

        Raises:
            RoundFailed: If fewer than `min_fit_clients` sites contributed or the mean
                holds a non-finite value.
        """
        self._require(server_round, len(mean.sites), "site(s) in the secure aggregate")
        if not all(np.all(np.isfinite(v)) for v in mean.delta.values()):
            raise RoundFailed(f"round {server_round}: the secure aggregate is not finite")
        state = {
            k: (ref.astype(np.float64) + mean.delta[k]).astype(ref.dtype)
            for k, ref in reference.items()
        }
        return RoundOutcome(state=state, accepted=list(mean.sites), rejected=[])

    def _require(self, server_round: int, count: int, what: str) -> None:
        if count < self.min_fit_clients:
            raise RoundFailed(
                f"round {server_round}: {count} {what}, min-fit-clients={self.min_fit_clients}"
            )


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg whose sites add (mu/2)·||w - w_global||² to their local loss."""

    proximal_mu: float = 0.01

    def client_config(self) -> dict[str, float]:
        return {"proximal_mu": self.proximal_mu}
