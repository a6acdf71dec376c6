"""Weighted averaging of adapter tensors (FedAvg, McMahan et al. 2017)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average each tensor over updates, weighting update i by weights[i].

    Accumulates in float64 and returns each tensor in its input dtype, so the result does
    not depend on the order of the updates beyond float64 rounding.

    Raises:
        ValueError: If there are no updates, the weights do not match, or sum to zero.
    """
    if not updates:
        raise ValueError("no updates to average")
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for name, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for wi, update in zip(w, updates, strict=True):
            acc += wi * update[name].astype(np.float64)
        out[name] = acc.astype(first.dtype)
    return out


def contribution_shares(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    reference: Mapping[str, np.ndarray],
) -> list[float]:
    """Each update's share ``p_i·‖Δ_i‖ / Σ_j p_j·‖Δ_j‖`` of a weighted average's movement.

    ``Δ_i = update_i - reference`` and ``p`` the normalised weights: with alike sites each
    holds ``1/n``; a site that claims a large weight or sends a large update holds more.
    All zeros when nothing moved.
    """
    w = np.asarray(weights, dtype=np.float64)
    norms = np.array(
        [
            np.sqrt(
                sum(
                    float(np.sum(np.square(u[k].astype(np.float64) - ref.astype(np.float64))))
                    for k, ref in reference.items()
                )
            )
            for u in updates
        ]
    )
    moved = w * norms
    total = float(moved.sum())
    return [float(m / total) if total > 0 else 0.0 for m in moved]
