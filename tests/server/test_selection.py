"""The rule that picks OUT/adapter: best round on the central held-out file, or last."""

from __future__ import annotations

import numpy as np
import pytest

from clients.task.errors import ConfigError
from server.record import headline_source
from server.selection import BestRound, chosen_round


def test_best_round_keeps_a_copy_and_a_later_round_wins_ties() -> None:
    best = BestRound()
    state = {"w": np.zeros(2, np.float32)}

    assert best.observe(1, 0.50, state)
    state["w"][:] = 1  # the loop reuses its arrays; the kept copy must not change
    assert not best.observe(2, 0.40, state)
    assert best.observe(3, 0.50, state)  # tie: the later round
    assert not best.observe(4, float("nan"), state)
    assert not best.observe(5, None, state)

    assert (best.round, best.accuracy) == (3, 0.50)
    np.testing.assert_array_equal(best.state["w"], [1, 1])


@pytest.mark.parametrize(
    ("rule", "best_round", "expected"),
    [("best", 3, 3), ("best", 0, 5), ("last", 3, 5)],  # no eval-file: best falls back to last
)
def test_chosen_round(rule: str, best_round: int, expected: int) -> None:
    assert chosen_round(rule=rule, best_round=best_round, last_round=5) == expected


def test_unknown_rule_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.keep='first'"):
        chosen_round(rule="first", best_round=1, last_round=2)


def test_headline_names_its_source() -> None:
    assert headline_source(central=True, evaluated_sites=3).startswith("central held-out file")
    assert headline_source(central=False, evaluated_sites=2) == (
        "federated mean over 2 site(s) with held-out rows"
    )
    assert headline_source(central=False, evaluated_sites=0).startswith("none")
