"""Bounded influence: no site carries much more of the global update than the median site.

FedAvg weighs a site by the example count it *claims* and takes its update as sent, so
one site that claims 10^7 examples, or sends an update just under the absolute norm
bound (``update.max-norm``), becomes the global update. `BoundedInfluence` wraps a
strategy and bounds both against the round itself, so the bound follows the federation
rather than a number fixed in advance:

- **weights**: a site's aggregation weight is capped at ``max_weight_ratio`` times the
  round's median weight (`cap_weights`);
- **norms**: a site's update ``local - global`` is clipped to ``max_norm_ratio`` times
  the round's median update norm (norm bounding, Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?", with the round's median in place of a fixed bound).

When the server *sums* some tensors instead of averaging them (``server.aggregate =
"sum-head"`` sums the classification head, strategies/server_opt.py), a site's step is
``Δ_rest / n + Δ_head``: bounding only the whole update's norm would let a site put its
whole allowance into the head, where it counts ``n`` times, and carry about half the step
whatever ``n``. With ``summed`` set, the summed tensors and the others are therefore
bounded on their own, each by the round's median for that part, and the recorded shares
count the summed part as the step does.

The median is the lower median, so a hostile minority cannot move it: with ``n`` sites of
which fewer than half are hostile, it is an honest site's value (for ``n = 2`` the
smaller of the two). With honest sites alike, a single site's contribution
``weight × norm`` is at most ``r = max_weight_ratio × max_norm_ratio`` times theirs, and
its share of the sum of contributions at most ``r / (n - 1 + r)``; for ``r ≤ 2`` that is
at most twice the fair share ``1/n`` for every ``n`` (since ``r (n - 2) ≤ 2 (n - 1)``).
scripts/bench_robustness.py measures it with a hostile site among ten.

The wrapper needs single updates, so it cannot work on a SecAgg+ round's mean:
`BoundedInfluence.aggregate_mean` refuses, and the run settings refuse the combination
before round 1. What bounds a site there is SecAgg+'s own: its weight by
``secagg.max-weight`` and every coordinate of the mean by ``±secagg.clipping-range``
(strategies/secagg.py).

Usage::

    strategy = BoundedInfluence(FedAvg(), max_weight_ratio=2.0, max_norm_ratio=1.0)
    outcome = strategy.aggregate(server_round, reference, updates)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from clients.task.errors import ConfigError
from strategies.aggregate import contribution_shares, weighted_average
from strategies.dp import global_norm
from strategies.fedexp import weighted_spread
from strategies.strategy import MeanUpdate, RoundOutcome, SiteUpdate, State, Strategy

log = logging.getLogger(__name__)


def lower_median(values: Sequence[float]) -> float:
    """The ``⌈n/2⌉``-th smallest value: a value of the majority whenever one exists.

    Raises:
        ValueError: For no values.
    """
    if not values:
        raise ValueError("no values")
    return sorted(values)[(len(values) - 1) // 2]


def cap_weights(weights: Sequence[float], *, ratio: float) -> list[float]:
    """Each weight capped at ``ratio`` times the lower median; ``ratio`` 0 leaves them.

    Raises:
        ValueError: For no weights.
    """
    if ratio <= 0:
        return [float(w) for w in weights]
    cap = ratio * lower_median([float(w) for w in weights])
    return [min(float(w), cap) for w in weights]


def norm_bound(norms: Sequence[float], *, ratio: float) -> float:
    """The largest update norm a round accepts unclipped: ``ratio`` × lower median norm.

    ``inf`` when ``ratio`` is 0 (no bound).
    """
    return ratio * lower_median(norms) if ratio > 0 else float("inf")


@dataclass(frozen=True)
class BoundedInfluence:
    """Wraps a strategy: caps weights and clips update norms relative to the round.

    Attributes:
        inner: The strategy that judges the updates (validation, rejection).
        max_weight_ratio: Cap on a weight, as a multiple of the median weight; 0 is off.
        max_norm_ratio: Cap on an update norm, as a multiple of the median; 0 is off.
        summed: A name part of the tensors the server step sums rather than averages
            (``HEAD_MARK`` under ``server.aggregate="sum-head"``); they and the others
            are norm-bounded separately. None bounds the whole update at once.
    """

    inner: Strategy
    max_weight_ratio: float = 2.0
    max_norm_ratio: float = 1.0
    summed: str | None = None

    def __post_init__(self) -> None:
        for key, value in (
            ("robust.max-weight-ratio", self.max_weight_ratio),
            ("robust.max-norm-ratio", self.max_norm_ratio),
        ):
            # below 1 would cap the median site itself; inf would bound nothing
            if not (value == 0 or 1 <= value < math.inf):
                raise ConfigError(f"{key}={value!r} must be 0 (off) or finite and >= 1")

    def client_config(self) -> dict[str, float]:
        return self.inner.client_config()

    def aggregate(
        self, server_round: int, reference: State, updates: Sequence[SiteUpdate]
    ) -> RoundOutcome:
        """Judge through the inner strategy, then average the accepted updates with
        capped weights and clipped norms.

        The accepted updates come back with their clipped tensors, so a wrapper around
        this one (client-level DP) averages what this one bounded.

        Raises:
            RoundFailed: From the inner strategy.
        """
        outcome = self.inner.aggregate(server_round, reference, updates)
        accepted = outcome.accepted
        # The inner strategy's weighting stays the rule (uniform under client-level DP and
        # the summing server aggregates); the cap only lowers a weight.
        uniform = getattr(self.inner, "weighting", "examples") == "uniform"
        raw = [1.0 if uniform else float(u.num_examples) for u in accepted]  # type: ignore[arg-type]
        weights = cap_weights(raw, ratio=self.max_weight_ratio)
        deltas = [
            {
                k: u.state[k].astype(np.float64) - ref.astype(np.float64)
                for k, ref in reference.items()
            }
            for u in accepted
        ]
        parts = _parts(reference, summed=self.summed)
        norms = [[global_norm({k: d[k] for k in part}) for part in parts] for d in deltas]
        bounds = [
            norm_bound([n[p] for n in norms], ratio=self.max_norm_ratio) for p in range(len(parts))
        ]
        bounded: list[SiteUpdate] = []
        for update, delta, norm, weight, asked in zip(
            accepted, deltas, norms, weights, raw, strict=True
        ):
            if weight < asked:
                log.info(
                    "round %d: site %s weight %s capped at %.4g (robust.max-weight-ratio)",
                    server_round, update.site, update.num_examples, weight,
                )  # fmt: skip
            if all(x <= b for x, b in zip(norm, bounds, strict=True)):
                bounded.append(update)  # unchanged, bit for bit
                continue
            log.info(
                "round %d: site %s update norm %s clipped to %s (robust.max-norm-ratio)",
                server_round, update.site, _fmt(norm), _fmt(bounds),
            )  # fmt: skip
            state = {k: update.state[k] for k in reference}
            for part, x, b in zip(parts, norm, bounds, strict=True):
                scale = b / x if x > b else 1.0
                for k in part:
                    ref = reference[k]
                    state[k] = (ref.astype(np.float64) + delta[k] * scale).astype(ref.dtype)
            bounded.append(replace(update, state=state))
        states = [u.state for u in bounded]
        clipped = [
            [min(x, b) for x, b in zip(norm, bounds, strict=True)] for norm in norms
        ]  # per part, after bounding
        if self.summed is None:
            shares = contribution_shares(states, weights, reference=reference)
        else:  # the summed part moves the step len(accepted) times its mean
            shares = _step_shares(clipped, weights, summed_scale=float(len(bounded)))
        return RoundOutcome(
            state=weighted_average(states, weights),
            accepted=bounded,
            rejected=outcome.rejected,
            spread=weighted_spread([sum(x * x for x in c) for c in clipped], weights),
            shares={u.site: share for u, share in zip(bounded, shares, strict=True)},
        )

    def aggregate_mean(self, server_round: int, reference: State, mean: MeanUpdate) -> RoundOutcome:
        """Refused: a secure round reveals no single update to bound.

        Raises:
            ConfigError: Naming both settings.
        """
        raise ConfigError(
            "robust.max-weight-ratio / robust.max-norm-ratio need single updates and "
            "cannot apply with secagg.enabled=true (SecAgg+ reveals only the sum); "
            "set both to 0 to rely on secagg.max-weight and secagg.clipping-range"
        )


def _parts(reference: State, *, summed: str | None) -> list[list[str]]:
    """The tensor names bounded together: all at once, or (the others, the summed ones)."""
    if summed is None:
        return [list(reference)]
    # An empty part (no summed tensors in this model) has norm 0 for every site: no bound.
    return [[k for k in reference if summed not in k], [k for k in reference if summed in k]]


def _step_shares(
    norms: Sequence[Sequence[float]], weights: Sequence[float], *, summed_scale: float
) -> list[float]:
    """Each site's share ``‖c_i‖ / Σ_j ‖c_j‖`` of a step that sums the last part.

    ``c_i = p_i · (Δ_rest_i, summed_scale · Δ_summed_i)`` with ``p`` the normalised
    weights, from the per-part norms (the parts are disjoint, so their norms add in
    squares); the summed part is the last.
    """
    w = np.asarray(weights, dtype=np.float64)
    p = w / w.sum() if w.sum() > 0 else w
    moved = []
    for pi, parts in zip(p, norms, strict=True):
        scales = [1.0] * (len(parts) - 1) + [summed_scale]
        moved.append(pi * np.sqrt(sum((s * x) ** 2 for s, x in zip(scales, parts, strict=True))))
    total = float(sum(moved))
    return [float(m / total) if total > 0 else 0.0 for m in moved]


def _fmt(values: Sequence[float]) -> str:
    return "/".join(f"{v:.4g}" for v in values)
