"""Client-level DP maths: clipping, noise of std z·C, the DP wrapper around FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.task.errors import ConfigError
from strategies.dp import (
    ClientLevelDP,
    DifferentiallyPrivate,
    add_gaussian_noise,
    clip_update,
    global_norm,
)
from strategies.fedavg import FedAvg
from strategies.strategy import MeanUpdate, SiteUpdate

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def test_clip_by_hand() -> None:
    # Arrange: a (3, 4) update has norm 5; clipping to 1 scales it by 1/5.
    delta = {"a": np.array([3.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    # Act
    clipped, norm = clip_update(delta, clip_norm=1.0)
    # Assert
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose([clipped["a"][0], clipped["b"][0]], [0.6, 0.8], rtol=1e-6)
    assert clipped["a"].dtype == np.float32


@settings(max_examples=50, deadline=None)
@given(t=arrays(np.float32, (4, 3), elements=finite), c=st.floats(0.01, 100))
def test_clipped_norm_never_exceeds_c_and_small_updates_pass(t: np.ndarray, c: float) -> None:
    clipped, norm = clip_update({"t": t}, clip_norm=c)
    assert global_norm(clipped) <= c * (1 + 1e-5)
    if norm <= c:
        np.testing.assert_array_equal(clipped["t"], t)


def test_noise_std_matches_z_times_c_statistically() -> None:
    # Arrange: z=1.5, C=0.2 on a mean of 4 updates -> std z·C/4 = 0.075 per coordinate.
    dp = ClientLevelDP(clip_norm=0.2, noise_multiplier=1.5)
    zeros = {"w": np.zeros(200_000, dtype=np.float64)}
    # Act
    noisy = dp.privatize_mean(zeros, zeros, num_updates=4, rng=np.random.default_rng(0))
    # Assert: the sample std of 2e5 normals is within ~0.5% (3.5 sigma) of the truth.
    assert dp.mean_noise_std(4) == pytest.approx(0.075)
    assert np.std(noisy["w"]) == pytest.approx(0.075, rel=0.008)
    assert abs(np.mean(noisy["w"])) < 4 * 0.075 / np.sqrt(2e5)
    # On the sum (mean x 4) the std is z·C.
    assert np.std(noisy["w"] * 4) == pytest.approx(1.5 * 0.2, rel=0.008)


def test_noise_keeps_dtype_and_shape() -> None:
    out = add_gaussian_noise(
        {"w": np.zeros((2, 3), np.float32)}, std=1.0, rng=np.random.default_rng(1)
    )
    assert out["w"].shape == (2, 3) and out["w"].dtype == np.float32


def test_wrapper_averages_uniformly_and_adds_no_noise_at_z0() -> None:
    # Arrange: example counts 1 and 99 would weigh site b; under DP both weigh 1/2.
    ref = {"w": np.zeros(2, np.float32)}
    a = SiteUpdate("a", {"w": np.array([0.2, 0.0], np.float32)}, 1)
    b = SiteUpdate("b", {"w": np.array([0.0, 0.2], np.float32)}, 99)
    strategy = DifferentiallyPrivate(
        FedAvg(max_norm=1.0, min_fit_clients=2),
        ClientLevelDP(clip_norm=1.0, noise_multiplier=0.0),
        np.random.default_rng(0),
    )
    # Act
    outcome = strategy.aggregate(1, ref, [a, b])
    # Assert
    np.testing.assert_allclose(outcome.state["w"], [0.1, 0.1], rtol=1e-6)
    assert outcome.state["w"].dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "dp.clip-norm=0.0 must be > 0"),
        ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "dp.noise-multiplier=-1.0"),
        ({"clip_norm": 1.0, "noise_multiplier": float("inf")}, "dp.noise-multiplier=inf"),
        ({"clip_norm": float("inf"), "noise_multiplier": 1.0}, "dp.clip-norm=inf"),
    ],
)
def test_bad_mechanism_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClientLevelDP(**kwargs)


def test_secure_rounds_go_through_the_same_wrapper_and_noise() -> None:
    # Arrange: four sites' secure mean update is 0; z=1.5, C=0.2 -> std z·C/4 = 0.075.
    reference = {"w": np.zeros(200_000, np.float64)}
    sites = [SiteUpdate(f"s{i}", {}, 1) for i in range(4)]
    mean = MeanUpdate(delta={"w": np.zeros(200_000)}, sites=sites)
    strategy = DifferentiallyPrivate(
        FedAvg(max_norm=1.0, min_fit_clients=2),
        ClientLevelDP(clip_norm=0.2, noise_multiplier=1.5),
        np.random.default_rng(0),
    )
    # Act
    outcome = strategy.aggregate_mean(1, reference, mean)
    # Assert: the same mechanism as plain rounds, over the four contributors.
    assert np.std(outcome.state["w"]) == pytest.approx(0.075, rel=0.008)
    assert [u.site for u in outcome.accepted] == ["s0", "s1", "s2", "s3"]


def test_secure_round_without_noise_is_the_inner_strategys_mean() -> None:
    reference = {"w": np.array([1.0, 1.0], np.float32)}
    mean = MeanUpdate(delta={"w": np.array([0.25, -0.5])}, sites=[SiteUpdate("a", {}, 1)] * 2)
    inner = FedAvg(min_fit_clients=2)
    wrapped = DifferentiallyPrivate(inner, ClientLevelDP(clip_norm=1.0, noise_multiplier=0.0))
    np.testing.assert_array_equal(
        wrapped.aggregate_mean(1, reference, mean).state["w"],
        inner.aggregate_mean(1, reference, mean).state["w"],
    )
