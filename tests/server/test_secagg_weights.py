"""The unmasked SecAgg+ weight total against the weights the sites reported.

A pure unit seam: forging the weight slot needs a modified site mod, so these tests build
what a round revealed (`SecureRound`) by hand; honest rounds through the real protocol,
where the check must pass, are in tests/integration/test_secagg.py and test_privacy.py.
"""

from __future__ import annotations

import pytest

from server.secagg import SecureRound

Q = 4_194_304  # a quantization range


def _round(weights: list[int], total: int | None, *, max_weight: float) -> SecureRound:
    return SecureRound(
        mean_update={},
        sites=[(n, f"site-{n}", w, {}) for n, w in enumerate(weights, start=1)],
        weight_total=total,
        weight_range=Q,
        max_weight=max_weight,
    )


@pytest.mark.parametrize(
    ("weights", "max_weight"), [([1, 1, 1], 1.0), ([10, 30, 7], 1000.0), ([3], 7.0)]
)
def test_the_total_honest_mods_put_in_the_weight_slot_passes(
    weights: list[int], max_weight: float
) -> None:
    total = sum(round(w / max_weight * Q) for w in weights)
    assert _round(weights, total, max_weight=max_weight).weight_forgery() is None


def test_a_weight_slot_that_differs_from_the_reported_weights_fails_the_round() -> None:
    # Three sites report weight 1; one of them put 10^4 × the range in its masked slot.
    forged = _round([1, 1, 1], 2 * Q + 10_000 * Q, max_weight=1.0).weight_forgery()
    assert forged is not None and "forged" in forged and str(3 * Q) in forged
    assert _round([1, 1, 1], 3 * Q - 1, max_weight=1.0).weight_forgery() is not None


def test_nothing_unmasked_is_nothing_to_check() -> None:
    assert _round([1, 1], None, max_weight=1.0).weight_forgery() is None
