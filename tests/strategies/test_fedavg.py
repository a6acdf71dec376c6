"""FedAvg on what SecAgg+ reveals: the mean update and who contributed."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.errors import RoundFailed
from strategies.fedavg import FedAvg, FedProx
from strategies.strategy import MeanUpdate, SiteUpdate

REF = {"w": np.array([1.0, 2.0], np.float32)}


def _sites(n: int) -> list[SiteUpdate]:
    return [SiteUpdate(f"s{i}", {}, 10, {"train-loss": 0.5}) for i in range(n)]


def test_mean_update_is_added_to_the_global_state_in_its_dtype() -> None:
    # Arrange: the secure mean of the updates is (0.5, -0.25) in float64.
    mean = MeanUpdate(delta={"w": np.array([0.5, -0.25])}, sites=_sites(2))
    # Act
    outcome = FedAvg(min_fit_clients=2).aggregate_mean(1, REF, mean)
    # Assert
    np.testing.assert_array_equal(outcome.state["w"], [1.5, 1.75])
    assert outcome.state["w"].dtype == np.float32
    assert [u.site for u in outcome.accepted] == ["s0", "s1"] and outcome.rejected == []


def test_too_few_contributors_fail_the_secure_round() -> None:
    mean = MeanUpdate(delta={"w": np.zeros(2)}, sites=_sites(1))
    with pytest.raises(
        RoundFailed, match="1 site\\(s\\) in the secure aggregate, min-fit-clients=2"
    ):
        FedProx(min_fit_clients=2).aggregate_mean(3, REF, mean)


def test_a_non_finite_mean_fails_the_secure_round() -> None:
    mean = MeanUpdate(delta={"w": np.array([np.inf, 0.0])}, sites=_sites(3))
    with pytest.raises(RoundFailed, match="not finite"):
        FedAvg(min_fit_clients=2).aggregate_mean(2, REF, mean)
