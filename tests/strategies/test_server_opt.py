"""Server optimiser: FedAvg at the defaults, FedAvgM and FedAdam algebra otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.task.errors import ConfigError
from strategies.fedavg import FedAvg
from strategies.server_opt import BETA2, TAU, ServerOptimizer
from strategies.strategy import SiteUpdate

vectors = arrays(np.float32, 5, elements=st.floats(-10, 10, width=32))


@given(current=vectors, average=vectors)
@settings(max_examples=50, deadline=None)
def test_defaults_return_the_average_unchanged(current: np.ndarray, average: np.ndarray) -> None:
    state, server_state = ServerOptimizer().step({"w": current}, {"w": average}, {})
    np.testing.assert_array_equal(state["w"], average)
    assert server_state == {}


@given(current=vectors, average=vectors, lr=st.floats(0.1, 5.0))
@settings(max_examples=50, deadline=None)
def test_learning_rate_scales_the_pseudo_gradient(
    current: np.ndarray, average: np.ndarray, lr: float
) -> None:
    state, _ = ServerOptimizer(learning_rate=lr).step({"w": current}, {"w": average}, {})
    expected = current.astype(np.float64) + lr * (average.astype(np.float64) - current)
    np.testing.assert_allclose(state["w"], expected, rtol=1e-5, atol=1e-4)


def test_momentum_accumulates_across_rounds() -> None:
    opt = ServerOptimizer(learning_rate=1.0, momentum=0.5)
    w = {"w": np.zeros(2, np.float32)}
    # Every round the sites move the adapter by +1 from wherever it is.
    w1, v1 = opt.step(w, {"w": w["w"] + 1}, {})
    np.testing.assert_allclose(w1["w"], [1, 1])
    w2, v2 = opt.step(w1, {"w": w1["w"] + 1}, v1)
    np.testing.assert_allclose(v2["m::w"], [1.5, 1.5])
    np.testing.assert_allclose(w2["w"], [2.5, 2.5])
    w3, _ = opt.step(w2, {"w": w2["w"] + 1}, v2)
    np.testing.assert_allclose(w3["w"], [4.25, 4.25])
    assert w3["w"].dtype == np.float32


def test_step_is_linear_so_ffa_products_move_exactly() -> None:
    """With A fixed, stepping B steps B·A by the same rule: the FFA-LoRA exactness holds."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4))
    b0, b_avg, vel = (rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3))
    opt = ServerOptimizer(learning_rate=2.0, momentum=0.9)
    b1, _ = opt.step({"b": b0}, {"b": b_avg}, {"m::b": vel})
    expected = b0 @ a + 2.0 * (0.9 * vel @ a + (b_avg - b0) @ a)
    np.testing.assert_allclose(b1["b"] @ a, expected, rtol=1e-4, atol=1e-4)


def test_adam_matches_an_independent_recomputation() -> None:
    opt = ServerOptimizer(kind="adam", learning_rate=0.1, momentum=0.9)
    rng = np.random.default_rng(1)
    w = {"w": rng.normal(size=4).astype(np.float32)}
    state: dict[str, np.ndarray] = {}
    m = v = np.zeros(4)
    for _ in range(3):
        delta = rng.normal(size=4)
        expected_m = 0.9 * m + 0.1 * delta
        expected_v = BETA2 * v + (1 - BETA2) * delta**2
        expected_w = w["w"] + 0.1 * expected_m / (np.sqrt(expected_v) + TAU)
        w, state = opt.step(w, {"w": (w["w"] + delta).astype(np.float32)}, state)
        np.testing.assert_allclose(w["w"], expected_w, rtol=1e-4, atol=1e-5)
        m, v = expected_m, expected_v
    assert set(state) == {"m::w", "v::w"}


def test_adam_moves_a_diluted_tensor_as_far_as_a_strong_one() -> None:
    """Per-coordinate scaling: a 100x smaller (e.g. diluted) change takes a similar step."""
    opt = ServerOptimizer(kind="adam", learning_rate=0.01, momentum=0.0)
    zero = {"strong": np.zeros(1, np.float32), "weak": np.zeros(1, np.float32)}
    avg = {"strong": np.ones(1, np.float32), "weak": np.full(1, 0.01, np.float32)}
    w, _ = opt.step(zero, avg, {})
    assert w["weak"][0] > 0.5 * w["strong"][0] > 0


@pytest.mark.parametrize(
    ("kind", "lr", "momentum"),
    [("sgd", 0.0, 0.0), ("sgd", -1.0, 0.0), ("sgd", 1.0, 1.0), ("sgd", 1.0, -0.1), ("yogi", 1, 0)],
)
def test_bad_hyperparameters_are_refused(kind: str, lr: float, momentum: float) -> None:
    with pytest.raises(ConfigError, match="server"):
        ServerOptimizer(kind=kind, learning_rate=lr, momentum=momentum)


@pytest.mark.parametrize("key", ["learning_rate", "lora_scale"])
def test_an_infinite_step_is_refused(key: str) -> None:
    # inf passed "> 0" and made the first step's global adapter inf/NaN.
    name = "server." + key.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"{name}=inf must be finite"):
        ServerOptimizer(**{key: float("inf")})


def test_sum_moves_by_the_sum_of_the_updates() -> None:
    # Three sites move w from 1 by +1, +2 and +6: uniform mean 1 + 3 = 4, sum of the
    # updates 9, so the new w is 1 + 9 = 10 (and FedAvgM's momentum then works on sums).
    current = {"w": np.array([1.0], np.float32)}
    updates = [{"w": np.array([v], np.float32)} for v in (2.0, 3.0, 7.0)]
    outcome = FedAvg(weighting="uniform").aggregate(
        1, current, [SiteUpdate(s, u, n) for s, u, n in zip("abc", updates, (1, 5, 9), strict=True)]
    )
    np.testing.assert_allclose(outcome.state["w"], [4.0])  # uniform, not by example counts

    new, state = ServerOptimizer(aggregate="sum").step(current, outcome.state, {}, num_updates=3)

    np.testing.assert_allclose(new["w"], [10.0])
    assert new["w"].dtype == np.float32 and state == {}
    with_momentum = ServerOptimizer(aggregate="sum", momentum=0.5)
    w1, s1 = with_momentum.step(current, outcome.state, {}, num_updates=3)
    w2, _ = with_momentum.step(w1, {"w": w1["w"] + 3}, s1, num_updates=3)  # sum +9 again
    np.testing.assert_allclose(w2["w"], [10.0 + 9 + 0.5 * 9])


def test_sum_is_not_the_identity_and_bad_aggregate_is_refused() -> None:
    assert not ServerOptimizer(aggregate="sum").is_identity
    with pytest.raises(ConfigError, match=r"server\.aggregate='max'"):
        ServerOptimizer(aggregate="max")


def test_sum_head_sums_only_the_classification_head() -> None:
    # Two sites: the head row moves +1 at one site and 0 at the other (FedLC leaves the
    # rows of labels a site lacks untouched), LoRA B moves +1 and +3. Uniform mean: head
    # +0.5, B +2. sum-head: head 2 · 0.5 = +1 (the site that has the label, undiluted),
    # B stays at the mean +2.
    head = "base_model.model.classifier.modules_to_save.default.weight"
    lora = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"
    current = {head: np.zeros(1, np.float32), lora: np.zeros(1, np.float32)}
    mean = {head: np.array([0.5], np.float32), lora: np.array([2.0], np.float32)}

    new, _ = ServerOptimizer(aggregate="sum-head").step(current, mean, {}, num_updates=2)

    np.testing.assert_allclose(new[head], [1.0])
    np.testing.assert_allclose(new[lora], [2.0])


def test_lora_scale_steps_the_lora_tensors_further_and_leaves_the_head() -> None:
    # sum-head over two sites with lora_scale 3: the head moves by the sum of its updates
    # (2 · 0.5 = +1, as without the scale); B by 3 × its mean update (+2) = +6.
    head = "base_model.model.classifier.modules_to_save.default.weight"
    lora = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"
    current = {head: np.zeros(1, np.float32), lora: np.ones(1, np.float32)}
    mean = {head: np.array([0.5], np.float32), lora: np.array([3.0], np.float32)}
    opt = ServerOptimizer(aggregate="sum-head", lora_scale=3.0)

    new, _ = opt.step(current, mean, {}, num_updates=2)

    np.testing.assert_allclose(new[head], [1.0])
    np.testing.assert_allclose(new[lora], [1.0 + 3 * 2.0])
    assert not ServerOptimizer(lora_scale=2.0).is_identity
    # With momentum the scale multiplies the whole heavy-ball step, as the server lr does.
    w1, s1 = ServerOptimizer(momentum=0.5, lora_scale=2.0).step(
        {lora: np.zeros(1, np.float32)}, {lora: np.ones(1, np.float32)}, {}
    )
    w2, _ = ServerOptimizer(momentum=0.5, lora_scale=2.0).step(w1, {lora: w1[lora] + 1}, s1)
    np.testing.assert_allclose(w2[lora], [2.0 + 2.0 * 1.5])
    with pytest.raises(ConfigError, match=r"server\.lora-scale=0\.0"):
        ServerOptimizer(lora_scale=0.0)


def test_a_uniform_mean_steps_to_the_average_like_fedavg() -> None:
    # The round's weighting makes the average uniform; the server step is the average
    # itself, not the sum the other uniform modes take (n times too far here).
    current = {"w": np.zeros(2, np.float32)}
    average = {"w": np.array([1.0, -2.0], np.float32)}
    new, state = ServerOptimizer(aggregate="uniform-mean").step(current, average, {}, num_updates=5)
    np.testing.assert_allclose(new["w"], average["w"])
    assert state == {}
    # Past the identity shortcut: half the average's step, not half of five times it.
    half, _ = ServerOptimizer(aggregate="uniform-mean", learning_rate=0.5).step(
        current, average, {}, num_updates=5
    )
    np.testing.assert_allclose(half["w"], [0.5, -1.0])
