"""What the server holds about the sites of one run, and how it judges what they say.

The round loop (server/loop.py) asks `RunSites` to turn a train reply into an update it
may aggregate: the reply's site id bound to its Flower node (server/identity.py), its
metrics checked against the round's plan (strategies/validation.py). After each round it
notes what the accepted sites trained on: their example counts, which bound what their
evaluations may claim, and the sample-level ε the plan gave each site that trains with
DP-SGD (server/privacy.py), which is what the run records, never a site's own claim.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flwr.app import Message

from clients.task.plan import TrainPlan
from server.identity import SiteIdentities
from server.privacy import SampleLevelAccounts
from server.settings import RunSettings
from strategies.errors import UpdateRejected
from strategies.protocol import (
    SITE_DELTA,
    SITE_MAX_GRAD_NORM,
    SITE_NOISE_MULTIPLIER,
    Refusal,
    decode_train,
    sender,
)
from strategies.strategy import SiteUpdate
from strategies.validation import MAX_EXAMPLES, validate_train_metrics


class RunSites:
    """The sites of one run: their identities, what they trained on, their ε accounts.

    The loop hands it each round's plan (`start_round`) before it sends the round.
    """

    def __init__(
        self,
        identities: SiteIdentities,
        settings: RunSettings,
        history: list[dict[str, Any]],
        *,
        plan: TrainPlan,
    ) -> None:
        self.identities = identities
        self.settings = settings
        self.plan = plan
        self.examples: dict[str, int] = {}
        self.accounts = (
            SampleLevelAccounts.replay(settings.site_dp_delta, history)
            if settings.site_dp_noise_multiplier > 0
            else None
        )

    def start_round(self, plan: TrainPlan) -> None:
        """The plan the coming round's replies are judged against."""
        self.plan = plan

    def train_update(self, reply: Message) -> SiteUpdate | Refusal:
        """A plain train reply, its site bound to its node and its metrics checked.

        Raises:
            IdentityRejected: If the node may not speak for the site it names.
            UpdateRejected: For a malformed reply or a metric out of range.
        """
        site = self.identities.bind(reply.metadata.src_node_id, sender(reply))
        try:
            decoded = decode_train(reply)
        except ValueError as exc:
            raise UpdateRejected("format", str(exc)) from exc
        if isinstance(decoded, Refusal):
            return Refusal(site, decoded.reason)
        return replace(decoded, site=site, metrics=self.checked_metrics(decoded))

    def checked_metrics(self, update: SiteUpdate) -> dict[str, float]:
        """The update's metrics, validated against the plan (strategies/validation.py).

        Raises:
            UpdateRejected: With check ``metrics``.
        """
        n = update.num_examples
        valid_count = isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_EXAMPLES
        dp = self.plan.sample_dp()
        return validate_train_metrics(
            update.metrics,
            max_steps=self.plan.steps_for(n) if valid_count else None,  # type: ignore[arg-type]
            max_seconds=self.settings.round_timeout,
            sample_dp=None
            if dp is None
            else {
                SITE_NOISE_MULTIPLIER: dp.noise_multiplier,
                SITE_MAX_GRAD_NORM: dp.max_grad_norm,
                SITE_DELTA: dp.delta,
            },
        )

    def trained(self, accepted: list[SiteUpdate]) -> dict[str, dict[str, float]]:
        """Note the accepted sites' example counts; return their sample-level accounts."""
        for update in accepted:
            self.examples[update.site] = int(update.num_examples)  # type: ignore[call-overload]
        if self.accounts is None:
            return {}
        return {
            u.site: self.accounts.charge(
                u.site,
                noise_multiplier=self.plan.site_dp_noise_multiplier,
                num_examples=int(u.num_examples),  # type: ignore[call-overload]
                plan=self.plan,
            )
            for u in accepted
        }
