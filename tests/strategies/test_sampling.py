"""Site sampling: how many sites a round asks, and which, reproducibly per run and round."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies.sampling import sample_sites, sample_size


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "expected"),
    [
        (10, 1.0, 2, 10),  # everyone
        (10, 0.3, 2, 3),  # round(3.0)
        (10, 0.05, 2, 2),  # round(0.5) = 0, raised to the minimum
        (3, 0.5, 5, 3),  # never more than are connected
        (5, 0.5, 1, 2),  # round half to even: round(2.5) = 2
        (7, 0.5, 1, 4),  # round(3.5) = 4
    ],
)
def test_sample_size_by_hand(n: int, fraction: float, minimum: int, expected: int) -> None:
    assert sample_size(n, fraction=fraction, minimum=minimum) == expected


@given(n=st.integers(1, 500), fraction=st.floats(0, 1), minimum=st.integers(1, 50))
def test_sample_size_stays_within_minimum_and_connected(
    n: int, fraction: float, minimum: int
) -> None:
    k = sample_size(n, fraction=fraction, minimum=minimum)
    assert min(minimum, n) <= k <= n


def test_each_round_draws_from_the_runs_generator_in_order() -> None:
    # The run's generator Random(seed) yields one seed per round, in round order; a
    # resumed run must not restart it.
    run = random.Random(11)
    nodes = list(range(20))
    for server_round in range(1, 8):
        expected = sorted(random.Random(run.random()).sample(nodes, 5))
        assert sample_sites(nodes, 5, seed=11, server_round=server_round) == expected


def test_the_sample_does_not_depend_on_the_order_nodes_are_listed() -> None:
    nodes = [9, 3, 7, 1, 5]
    assert sample_sites(nodes, 3, seed=1, server_round=2) == sample_sites(
        sorted(nodes), 3, seed=1, server_round=2
    )
