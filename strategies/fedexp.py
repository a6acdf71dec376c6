"""FedExP: a server step size that extrapolates the averaged update (Jhunjhunwala et al. 2023).

"FedExP: Speeding Up Federated Averaging via Extrapolation" (ICLR 2023) treats the sites'
updates ``Δ_i`` as the projections of POCS (projections onto convex sets) and steps past
their average by

    η_t = max(1, Σ_i w_i ‖Δ_i‖² / (2 (‖Σ_i w_i Δ_i‖² + ε)))

with weights ``w_i`` summing to 1 (the paper's uniform ``1/M``; fedlora's example shares).
When the sites agree (``Δ_i`` alike) the ratio is about 1/2 and the step is plain FedAvg;
when label skew makes them pull apart, the average shrinks while the single updates do not
and the step grows, up to about the number of sites for orthogonal updates, which is
what a round of skewed sites needs: it moves the model by about one site's worth of steps
while consuming every site's data.

The numerator needs each update's norm, so FedExP needs more than the sum of the updates:
it is refused with ``secagg.enabled`` (server/settings.py).
"""

from __future__ import annotations

from collections.abc import Sequence

# ε keeps the step finite when the average update vanishes; the paper uses 1e-3 for
# small models. It only matters when ‖mean‖² is below it.
EPSILON = 1e-3


def extrapolation(*, spread: float, mean_sq_norm: float, epsilon: float = EPSILON) -> float:
    """FedExP's η_t from ``spread = Σ w_i ‖Δ_i‖²`` and ``mean_sq_norm = ‖Σ w_i Δ_i‖²``.

    Raises:
        ValueError: For a negative or non-finite input.
    """
    if not (spread >= 0 and mean_sq_norm >= 0 and epsilon > 0):
        raise ValueError(
            f"FedExP needs non-negative norms, got spread={spread!r}, "
            f"mean_sq_norm={mean_sq_norm!r}, epsilon={epsilon!r}"
        )
    return max(1.0, spread / (2.0 * (mean_sq_norm + epsilon)))


def weighted_spread(sq_norms: Sequence[float], weights: Sequence[float]) -> float:
    """``Σ w_i ‖Δ_i‖²`` with the weights normalised to sum to 1."""
    total = float(sum(weights))
    if len(sq_norms) != len(weights) or not total > 0:
        raise ValueError(f"{len(sq_norms)} norms but {len(weights)} weights summing to {total}")
    return sum(w * n for w, n in zip(weights, sq_norms, strict=True)) / total
