"""What one round did: a row of metrics.json and the round's MLflow metrics.

The round loop (server/loop.py) fills a `RoundRecord` as the round goes: sites that
failed, refused or sent a rejected update, what the strategy accepted, the client-level
privacy spent, the evaluations, and `RoundRecord.finish` closes the row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from server.privacy import ClientPrivacy
from strategies.bounded import cap_weights
from strategies.protocol import (
    TRAIN_LOSS,
    TRAIN_SECONDS,
    EvaluateReply,
    NoEvaluation,
)
from strategies.strategy import RoundOutcome

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What one round did; a row of metrics.json."""

    round: int
    loss: float | None = None
    accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    sampled: int = 0  # sites asked to train
    replies: int = 0  # of those, replies that arrived without an error
    sites: int = 0
    rejected: int = 0
    failed: int = 0
    train_loss: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    central_loss: float | None = None
    central_accuracy: float | None = None
    site_ids: list[str] = field(default_factory=list)
    rejections: list[dict[str, str]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: bool = False
    max_site_train_seconds: float = 0.0
    # Client-level DP: the (ε, δ) spent after this round and the mechanism's parameters.
    epsilon: float | None = None
    delta: float | None = None
    guarantee: str | None = None
    noise_multiplier: float | None = None
    sampling_rate: float | None = None
    # Sites that refused the round to stay within their own privacy budget.
    refused: int = 0
    refusals: list[dict[str, str]] = field(default_factory=list)
    # Sample-level DP: per site, the (ε, δ) the server accounts for its DP-SGD this run
    # (server/privacy.py) and this round's parameters; never a site's own claim.
    site_privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per site: what its accepted update says (examples, train-loss, train-seconds) and its
    # evaluation of the new global adapter on its held-out rows (accuracy, loss, examples).
    site_train: dict[str, dict[str, float]] = field(default_factory=dict)
    site_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    # What `accuracy`/`loss` were measured on (`headline_source`), how many sites sent a
    # federated evaluation, and the sites that hold no rows out (with their reason).
    headline: str = ""
    evaluated_sites: int = 0
    unevaluated: list[dict[str, str]] = field(default_factory=list)
    # Each accepted site's share of the round's movement as aggregated (strategies/
    # aggregate.py); 1/n each for alike sites.
    shares: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._started = time.perf_counter()  # not a field: no column of its own

    def failed_site(self, site: str, reason: str) -> None:
        """A sampled site crashed, timed out or dropped out."""
        log.warning("round %d: site %s failed: %s", self.round, site, reason)
        self.failures.append({"site": site, "reason": reason})

    def refused_site(self, site: str, reason: str) -> None:
        """A sampled site refused the round to stay within its privacy budget."""
        log.warning("round %d: site %s refused: %s", self.round, site, reason)
        self.refusals.append({"site": site, "reason": reason})

    def rejected_update(self, site: str, check: str, detail: str) -> None:
        """A site's reply could not be used (the strategy's own rejections come in
        `accepted`)."""
        log.warning(
            "round %d: rejected reply from site %s (%s): %s", self.round, site, check, detail
        )
        self.rejections.append({"site": site, "check": check, "detail": detail})

    def accepted(self, outcome: RoundOutcome) -> None:
        """What the strategy did with the round's updates."""
        self.rejections += [asdict(r) for r in outcome.rejected]
        self.site_ids = [u.site for u in outcome.accepted]
        self.sites = len(outcome.accepted)
        self.train_loss = weighted_mean(
            [
                (u.metrics[TRAIN_LOSS], int(u.num_examples))  # type: ignore[call-overload]
                for u in outcome.accepted
                if TRAIN_LOSS in u.metrics
            ]
        )
        self.max_site_train_seconds = max(
            (u.metrics.get(TRAIN_SECONDS, 0.0) for u in outcome.accepted), default=0.0
        )
        self.shares = dict(outcome.shares)
        self.site_train = {
            u.site: {
                "examples": float(u.num_examples),  # type: ignore[arg-type]
                **{k: float(u.metrics[k]) for k in (TRAIN_LOSS, TRAIN_SECONDS) if k in u.metrics},
            }
            for u in outcome.accepted
        }

    def privacy(self, privacy: ClientPrivacy, sampling_rate: float) -> None:
        """The client-level (ε, δ) spent so far; a skipped round released nothing."""
        self.epsilon = privacy.ledger.epsilon
        self.delta = privacy.ledger.delta
        self.guarantee = "client-level"
        self.noise_multiplier = privacy.mechanism.noise_multiplier
        self.sampling_rate = None if self.skipped else sampling_rate

    def evaluated(
        self,
        *,
        federated: Sequence[EvaluateReply | NoEvaluation] | None,
        central: tuple[float, float] | None,
        max_weight_ratio: float = 0.0,
    ) -> None:
        """The sites' evaluations on their held-out rows and (loss, accuracy) on the
        central file; sites without held-out rows are listed, not counted.

        With ``max_weight_ratio`` > 0 (bounded influence, strategies/bounded.py) each site's
        example count weighs at most that multiple of the median count, like its training
        weight, so no single site's claim decides the federated headline.
        """
        if federated is not None:
            results = [r for r in federated if isinstance(r, EvaluateReply)]
            self.unevaluated = [
                {"site": r.site, "reason": r.reason}
                for r in federated
                if isinstance(r, NoEvaluation)
            ]
            self.evaluated_sites = len(results)
            self.site_eval = {
                r.site: {"accuracy": r.accuracy, "loss": r.loss, "eval-examples": r.num_examples}
                for r in results
            }
            weights = (
                cap_weights([r.num_examples for r in results], ratio=max_weight_ratio)
                if results
                else []
            )
            self.federated_loss = weighted_mean(
                [(r.loss, w) for r, w in zip(results, weights, strict=True)]
            )
            self.federated_accuracy = weighted_mean(
                [(r.accuracy, w) for r, w in zip(results, weights, strict=True)]
            )
        if central is not None:
            self.central_loss, self.central_accuracy = central
        # The headline numbers: central evaluation when there is a held-out file, else the
        # mean over the sites that hold rows out; `headline` says which.
        self.loss = self.central_loss if central is not None else self.federated_loss
        self.accuracy = self.central_accuracy if central is not None else self.federated_accuracy
        self.headline = headline_source(
            central=central is not None, evaluated_sites=self.evaluated_sites
        )

    def finish(self) -> dict[str, Any]:
        """Count, time and close the round; returns its metrics.json row."""
        self.rejected = len(self.rejections)
        self.failed = len(self.failures)
        self.refused = len(self.refusals)
        self.seconds = time.perf_counter() - self._started
        return asdict(self)

    def site_metrics(self) -> dict[str, dict[str, float]]:
        """Per site, its numbers of the round (training and evaluation), for MLflow."""
        out: dict[str, dict[str, float]] = {}
        for per_site in (self.site_train, self.site_eval):
            for site, values in per_site.items():
                out.setdefault(site, {}).update(values)
        return out

    def summary(self, rounds: int) -> str:
        """One line for the operator's log (``flwr run --stream``) after `finish`."""
        parts = [
            f"round {self.round}/{rounds} {'skipped' if self.skipped else 'done'} "
            f"in {self.seconds:.1f}s: {self.sampled} sampled, {self.replies} replied, "
            f"{self.sites} accepted, {self.rejected} rejected, {self.failed} failed, "
            f"{self.refused} refused"
        ]
        if self.accuracy is not None:
            parts.append(f"accuracy {self.accuracy:.4f}")
        if self.epsilon is not None:
            parts.append(f"ε {self.epsilon:.4g} (δ {self.delta:g})")
        trouble = [f"{r['site']}: {r.get('reason') or r.get('detail')}" for r in self.failures]
        trouble += [f"{r['site']}: {r.get('check')}" for r in self.rejections]
        line = ", ".join(parts)
        return f"{line}; {'; '.join(trouble)}" if trouble else line

    def metrics(self) -> dict[str, float]:
        """Numeric fields for MLflow."""
        out: dict[str, float] = {}
        for key, value in asdict(self).items():
            if key != "round" and isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = float(value)
        out["skipped"] = float(self.skipped)
        return out


def headline_source(*, central: bool, evaluated_sites: int) -> str:
    """Name the data behind a round's headline accuracy (metrics.json and MLflow)."""
    if central:
        return "central held-out file (eval-file)"
    if evaluated_sites:
        return f"federated mean over {evaluated_sites} site(s) with held-out rows"
    return "none: no eval-file and no site holds rows out"


def weighted_mean(values: list[tuple[float, float]]) -> float | None:
    """The weighted mean of (value, weight) pairs, or None without weight."""
    total = sum(n for _, n in values)
    return sum(v * n for v, n in values) / total if total else None
