"""Server-side checks on one site's update before it may enter the aggregate.

A hostile or broken site can send tensors with the wrong keys, shapes or dtype, NaN or
Inf values, a huge norm that would drag the average, or a made-up example count to
outweigh the others. Each check raises `UpdateRejected` with the check's name and the
offending value; the round loop logs it with the site id and goes on without that site.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.errors import UpdateRejected

CHECKS = ("keys", "dtype", "shape", "finite", "norm", "num-examples")


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
    max_examples: int = 10_000_000,
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
