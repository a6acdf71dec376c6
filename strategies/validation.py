"""Server-side checks on what one site sends before any of it is used.

A hostile or broken site can send tensors with the wrong keys, shapes or dtype, NaN or
Inf values, a huge norm that would drag the average, or a made-up example count to
outweigh the others (`validate_update`); and metrics that are NaN, out of range or
larger than what it could have done, which would otherwise reach the round's record,
the headline metric and the gates that read them (`validate_train_metrics`,
`validate_evaluation`). Each check raises `UpdateRejected` with the check's name and the
offending value; the round loop logs it with the site id and goes on without that site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from clients.task.numbers import is_integer
from strategies.errors import UpdateRejected
from strategies.protocol import (
    SITE_DELTA,
    SITE_EPSILON,
    SITE_MAX_GRAD_NORM,
    SITE_NOISE_MULTIPLIER,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    EvaluateReply,
)

CHECKS = ("keys", "dtype", "shape", "finite", "norm", "num-examples", "metrics")
MAX_EXAMPLES = 10_000_000  # the largest example count a site may report
# The site's statement of its DP-SGD parameters, compared with the plan's.
SAMPLE_DP_CLAIMS = (SITE_NOISE_MULTIPLIER, SITE_MAX_GRAD_NORM, SITE_DELTA)


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - reference) over all tensors, in float64."""
    total = 0.0
    for name, ref in reference.items():
        delta = update[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return float(np.sqrt(total))


def validate_update(
    update: Mapping[str, np.ndarray],
    *,
    reference: Mapping[str, np.ndarray],
    num_examples: object,
    max_norm: float,
    max_examples: int = MAX_EXAMPLES,
) -> float:
    """Check an update against the global state it was trained from.

    Args:
        update: The site's tensors.
        reference: The global tensors sent to the site this round.
        num_examples: The example count the site claims (its aggregation weight).
        max_norm: Largest accepted L2 norm of (update - reference).
        max_examples: Largest accepted example count.

    Returns:
        The update's L2 norm relative to the reference.

    Raises:
        UpdateRejected: With ``check`` one of `CHECKS`.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected("keys", f"missing={missing[:3]} unexpected={extra[:3]}")
    for name, ref in reference.items():
        value = update[name]
        if not isinstance(value, np.ndarray) or value.dtype != ref.dtype:
            got = getattr(value, "dtype", type(value).__name__)
            raise UpdateRejected("dtype", f"{name} has dtype {got}, expected {ref.dtype}")
        if value.shape != ref.shape:
            raise UpdateRejected("shape", f"{name} has shape {value.shape}, expected {ref.shape}")
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise UpdateRejected("finite", f"{name} has {bad} non-finite values")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise UpdateRejected("num-examples", f"num-examples={num_examples!r} is not an integer")
    if not 0 < int(num_examples) <= max_examples:
        raise UpdateRejected(
            "num-examples", f"num-examples={num_examples!r} is outside 1..{max_examples}"
        )
    norm = update_norm(update, reference)
    if norm > max_norm:
        raise UpdateRejected("norm", f"update norm {norm:.4g} exceeds update.max-norm={max_norm}")
    return norm


def _in_range(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejected("metrics", f"{name}={value!r} is not a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise UpdateRejected("metrics", f"{name}={value!r} is outside [{low:g}, {high:g}]")
    return float(value)


def validate_train_metrics(
    metrics: Mapping[str, float],
    *,
    max_steps: int | None,
    max_seconds: float,
    sample_dp: Mapping[str, float] | None,
    min_noise_multiplier: float | None = None,
) -> dict[str, float]:
    """The train reply's metrics this module knows, each checked; others are dropped.

    Args:
        metrics: The reply's metrics (without the example count, checked as a weight).
        max_steps: The most local steps the plan allows this site (from its claimed
            example count), or None if the count is itself invalid.
        max_seconds: The round timeout: no reply takes longer.
        sample_dp: The plan's DP-SGD parameters by metric name (`SAMPLE_DP_CLAIMS`), or
            None without DP-SGD. A site must state exactly these; its ε claim is checked
            but never used (the server accounts ε itself, server/privacy.py).
        min_noise_multiplier: Under ``site-dp.target-epsilon``, the noise multiplier the
            target requires at this site's claimed example count (the server solves it
            as the site does). The site's stated noise multiplier must then be at least
            this instead of equal to ``sample_dp``'s: more noise is allowed, less never.

    Raises:
        UpdateRejected: With check ``metrics``.
    """
    out: dict[str, float] = {}
    if TRAIN_LOSS in metrics:
        out[TRAIN_LOSS] = _in_range(TRAIN_LOSS, metrics[TRAIN_LOSS], 0.0, math.inf)
    if TRAIN_SECONDS in metrics:
        out[TRAIN_SECONDS] = _in_range(TRAIN_SECONDS, metrics[TRAIN_SECONDS], 0.0, max_seconds)
    if STEPS in metrics:
        steps = _in_range(STEPS, metrics[STEPS], 0, max_steps if max_steps is not None else 0)
        if steps != int(steps):
            raise UpdateRejected("metrics", f"{STEPS}={steps!r} is not an integer")
        out[STEPS] = steps
    if sample_dp is None:
        return out
    for name in SAMPLE_DP_CLAIMS:
        if name == SITE_NOISE_MULTIPLIER and min_noise_multiplier is not None:
            stated = _in_range(name, metrics.get(name), 0.0, math.inf)
            if not stated >= min_noise_multiplier:
                raise UpdateRejected(
                    "metrics",
                    f"{name}={stated!r} is below the {min_noise_multiplier!r} that the plan's "
                    "site-dp.target-epsilon requires at the site's example count",
                )
            continue
        if metrics.get(name) != sample_dp[name]:
            raise UpdateRejected(
                "metrics",
                f"{name}={metrics.get(name)!r} is not the plan's {sample_dp[name]!r}: the "
                "site did not state that it trained with the plan's DP-SGD",
            )
    _in_range(SITE_EPSILON, metrics.get(SITE_EPSILON), 0.0, math.inf)
    return out


def validate_evaluation(
    result: EvaluateReply, *, max_examples: int = MAX_EXAMPLES, trained_on: int | None = None
) -> None:
    """Check an evaluation reply before it enters the federated mean.

    Args:
        result: The decoded reply.
        max_examples: The largest count any site may report.
        trained_on: The example count this site trained on in the run, if it did: an
            honest site holds out at most half of its rows (clients/site/settings.py),
            so it never evaluates on more rows than it trains on.

    Raises:
        UpdateRejected: With check ``metrics``.
    """
    limit = min(max_examples, trained_on) if trained_on is not None else max_examples
    count = result.num_examples
    if not is_integer(count) or not 1 <= count <= limit:
        raise UpdateRejected("metrics", f"evaluation num-examples={count!r} is outside 1..{limit}")
    _in_range("loss", result.loss, 0.0, math.inf)
    _in_range("accuracy", result.accuracy, 0.0, 1.0)
