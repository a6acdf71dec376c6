"""Bounded influence: weights and norms capped by the round's lower median, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.task.errors import ConfigError
from strategies.bounded import BoundedInfluence, cap_weights, lower_median, norm_bound
from strategies.fedavg import FedAvg
from strategies.strategy import MeanUpdate, SiteUpdate

REF = {"w": np.zeros(2, np.float32)}


def _site(name: str, delta: tuple[float, float], examples: int) -> SiteUpdate:
    return SiteUpdate(name, {"w": np.array(delta, np.float32)}, examples)


def test_lower_median_and_caps() -> None:
    assert lower_median([30.0, 10.0, 1e7, 20.0]) == 20.0  # 2nd of 4: an honest value
    assert lower_median([5.0, 1e9]) == 5.0
    assert cap_weights([10, 20, 30, 10**7], ratio=2.0) == [10.0, 20.0, 30.0, 40.0]
    assert cap_weights([10, 10**7], ratio=0.0) == [10.0, 1e7]  # off
    assert norm_bound([1.0, 3.0, 2.0], ratio=1.5) == 3.0
    assert norm_bound([1.0], ratio=0.0) == float("inf")


def test_a_site_claiming_every_example_with_a_huge_update_is_bounded() -> None:
    # Arrange: a and b move (0.3, 0.4) (norm 0.5) with 10 and 20 examples; the hostile
    # site claims 10^7 and moves (-6, -8) (norm 10, under update.max-norm).
    updates = [
        _site("a", (0.3, 0.4), 10),
        _site("b", (0.3, 0.4), 20),
        _site("hostile", (-6.0, -8.0), 10**7),
    ]
    strategy = BoundedInfluence(FedAvg(max_norm=1000.0), max_weight_ratio=2.0, max_norm_ratio=1.0)
    # Act
    outcome = strategy.aggregate(1, REF, updates)
    # Assert: weights 10, 20, min(10^7, 2·20) = 40; the hostile update clipped to the
    # median norm 0.5: (-0.3, -0.4). Mean: (10 + 20 - 40) / 70 · (0.3, 0.4).
    np.testing.assert_allclose(outcome.state["w"], np.array([0.3, 0.4]) * (-10 / 70), rtol=1e-6)
    np.testing.assert_allclose(outcome.accepted[2].state["w"], [-0.3, -0.4], rtol=1e-6)
    assert outcome.accepted[0] is updates[0]  # an update within bounds is passed on as sent
    assert outcome.state["w"].dtype == np.float32


def test_the_inner_strategys_uniform_weighting_stays_the_rule() -> None:
    # Arrange: under the summing server aggregates (and client-level DP) FedAvg weighs every
    # site the same; bounding must not bring the example counts back.
    updates = [_site("a", (0.3, 0.4), 1), _site("b", (0.6, 0.8), 1000)]
    strategy = BoundedInfluence(FedAvg(weighting="uniform"), max_norm_ratio=0.0)
    # Act
    outcome = strategy.aggregate(1, REF, updates)
    # Assert: the plain mean of the two updates, and its spread (0.25 + 1) / 2.
    np.testing.assert_allclose(outcome.state["w"], [0.45, 0.6], rtol=1e-6)
    assert outcome.spread == pytest.approx(0.625, rel=1e-6)


@given(
    n=st.integers(min_value=3, max_value=40),
    weight=st.integers(min_value=1, max_value=10**7),
    norm=st.floats(min_value=1e-3, max_value=1e3),
    honest_weight=st.integers(min_value=1, max_value=10**4),
    honest_norm=st.floats(min_value=1e-3, max_value=10.0),
)
def test_one_site_among_alike_ones_carries_at_most_twice_its_fair_share(
    n: int, weight: int, norm: float, honest_weight: int, honest_norm: float
) -> None:
    # Share of the contributions weight × norm after bounding (ratios 2 and 1: r = 2).
    norms = [honest_norm] * (n - 1) + [norm]
    weights = cap_weights([honest_weight] * (n - 1) + [weight], ratio=2.0)
    bound = norm_bound(norms, ratio=1.0)
    contributions = [w * min(x, bound) for w, x in zip(weights, norms, strict=True)]
    share = contributions[-1] / sum(contributions)
    assert share <= 2 / n + 1e-12


def test_a_secure_round_is_refused_naming_both_settings() -> None:
    mean = MeanUpdate(delta={"w": np.zeros(2)}, sites=[SiteUpdate("a", {}, 1)] * 3)
    with pytest.raises(ConfigError, match=r"robust\.max-weight-ratio.*secagg\.enabled"):
        BoundedInfluence(FedAvg()).aggregate_mean(1, REF, mean)


@pytest.mark.parametrize("ratio", [0.5, -1.0, float("nan"), float("inf")])
def test_a_ratio_below_one_or_infinite_is_refused(ratio: float) -> None:
    # inf would bound nothing (and inf × a median of 0 is NaN) while the run says bounded.
    with pytest.raises(ConfigError, match=r"robust\.max-norm-ratio="):
        BoundedInfluence(FedAvg(), max_norm_ratio=ratio)
    with pytest.raises(ConfigError, match=r"robust\.max-weight-ratio="):
        BoundedInfluence(FedAvg(), max_weight_ratio=ratio)


def test_a_site_cannot_put_its_whole_norm_into_a_summed_head() -> None:
    # Arrange: a run over a model's own pooler (server.aggregate = "auto" is then "sum-head",
    # uniform weights): the step is
    # the mean of the LoRA updates plus the *sum* of the head updates. Nine honest sites move
    # the LoRA tensor by 0.99 and the head by 0.1 (norm ~1); the hostile site moves only the
    # head, by 1 (norm 1: within the median norm, so a whole-update bound passes it).
    from server.settings import RunSettings
    from strategies.server_opt import HEAD_MARK
    from tests.server.test_settings import OK

    # server lr 1: the step below is the bounded sum itself
    settings = RunSettings.from_config({**OK, "head.pooling": "model", "server.learning-rate": 1.0})
    assert settings.server_optimizer.aggregate == "sum-head"  # the case this test is about
    lora, head = "layer.lora_B.default.weight", f"classifier.{HEAD_MARK}.default.weight"
    ref = {lora: np.zeros(2, np.float32), head: np.zeros(2, np.float32)}
    n = 10
    honest = [
        SiteUpdate(
            f"s{i}",
            {lora: np.array([0.99, 0], np.float32), head: np.array([0, 0.1], np.float32)},
            5,
        )
        for i in range(n - 1)
    ]
    hostile = SiteUpdate(
        "hostile", {lora: np.zeros(2, np.float32), head: np.array([1.0, 0], np.float32)}, 5
    )
    strategy = settings.bounded(settings.strategy())
    # Act
    outcome = strategy.aggregate(1, ref, [*honest, hostile])
    step, _ = settings.server_optimizer.step(ref, outcome.state, {}, num_updates=n)
    # Assert: the hostile head is clipped to the honest head norm (0.1), so the hostile
    # site moves the step by at most its part of it: within twice the fair share 1/n, and
    # the recorded share says so (the step sums the head: n × the mean head).
    np.testing.assert_allclose(step[head], [0.1, 0.9], rtol=1e-5)
    contribution = 0.1  # its clipped head, counted once in the sum
    honest_contribution = np.hypot(0.99 / n, 0.1)
    share = contribution / (contribution + (n - 1) * honest_contribution)
    assert share <= 2 / n
    assert outcome.shares["hostile"] == pytest.approx(share, rel=1e-5)
