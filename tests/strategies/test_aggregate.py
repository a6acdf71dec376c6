"""FedAvg invariants, with hand-worked values and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.aggregate import weighted_average

finite = st.floats(-100, 100, allow_nan=False, width=32)


def test_weighted_average_by_hand() -> None:
    # Arrange: weights 1 and 3 -> 0.25 * a + 0.75 * b
    a = {"w": np.array([0.0, 4.0], dtype=np.float32)}
    b = {"w": np.array([4.0, 0.0], dtype=np.float32)}
    # Act
    out = weighted_average([a, b], [1, 3])
    # Assert
    np.testing.assert_allclose(out["w"], [3.0, 1.0])
    assert out["w"].dtype == np.float32


@settings(max_examples=50, deadline=None)
@given(
    tensors=st.lists(arrays(np.float32, (3, 2), elements=finite), min_size=2, max_size=6),
    data=st.data(),
)
def test_permutation_invariance(tensors: list[np.ndarray], data: st.DataObject) -> None:
    weights = data.draw(
        st.lists(st.integers(1, 1000), min_size=len(tensors), max_size=len(tensors))
    )
    perm = data.draw(st.permutations(range(len(tensors))))
    updates = [{"w": t} for t in tensors]
    out = weighted_average(updates, weights)
    permuted = weighted_average([updates[i] for i in perm], [weights[i] for i in perm])
    np.testing.assert_allclose(out["w"], permuted["w"], rtol=1e-6, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(tensors=st.lists(arrays(np.float32, (4,), elements=finite), min_size=1, max_size=6))
def test_equal_weights_is_the_mean(tensors: list[np.ndarray]) -> None:
    out = weighted_average([{"w": t} for t in tensors], [7] * len(tensors))
    np.testing.assert_allclose(out["w"], np.mean(np.stack(tensors), axis=0), rtol=1e-5, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(
    bs=st.lists(arrays(np.float64, (5, 2), elements=finite), min_size=2, max_size=5),
    a=arrays(np.float64, (2, 3), elements=finite),
    data=st.data(),
)
def test_ffa_average_is_exact(bs: list[np.ndarray], a: np.ndarray, data: st.DataObject) -> None:
    """With A shared and frozen, mean_i(B_i)·A == mean_i(B_i·A): FFA-LoRA averaging is exact."""
    weights = data.draw(st.lists(st.integers(1, 50), min_size=len(bs), max_size=len(bs)))
    avg_b = weighted_average([{"b": b} for b in bs], weights)["b"]
    products = weighted_average([{"p": b @ a} for b in bs], weights)["p"]
    np.testing.assert_allclose(avg_b @ a, products, rtol=1e-9, atol=1e-6)


def test_plain_lora_average_is_not_exact() -> None:
    """Averaging A and B separately is not the average of B·A (why FFA is the default)."""
    b1, a1 = np.array([[1.0]]), np.array([[1.0]])
    b2, a2 = np.array([[0.0]]), np.array([[2.0]])
    mean_of_products = (b1 @ a1 + b2 @ a2) / 2  # 0.5
    product_of_means = ((b1 + b2) / 2) @ ((a1 + a2) / 2)  # 0.75
    assert mean_of_products[0, 0] == 0.5 and product_of_means[0, 0] == 0.75


@pytest.mark.parametrize(
    ("updates", "weights", "message"),
    [
        ([], [], "no updates"),
        ([{"w": np.zeros(1)}], [1, 2], "1 updates but 2 weights"),
        ([{"w": np.zeros(1)}], [0], "positive sum"),
        ([{"w": np.zeros(1)}, {"w": np.zeros(1)}], [-1, 2], "non-negative"),
    ],
)
def test_bad_arguments(updates: list, weights: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_average(updates, weights)


def test_contribution_shares_by_hand() -> None:
    from strategies.aggregate import contribution_shares

    ref = {"w": np.zeros(2, np.float32)}
    a = {"w": np.array([1.0, 0.0], np.float32)}  # norm 1
    b = {"w": np.array([0.0, -3.0], np.float32)}  # norm 3
    assert contribution_shares([a, b], [1, 1], reference=ref) == pytest.approx([0.25, 0.75])
    assert contribution_shares([a, b], [3, 1], reference=ref) == pytest.approx([0.5, 0.5])
    assert contribution_shares([ref, ref], [1, 1], reference=ref) == [0.0, 0.0]
