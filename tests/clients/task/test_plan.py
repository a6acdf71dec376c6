from __future__ import annotations

import pytest

from clients.task.errors import ConfigError
from clients.task.model import ModelSpec
from clients.task.plan import TrainPlan


def test_plan_round_trips_through_a_flat_config() -> None:
    plan = TrainPlan(
        spec=ModelSpec(labels=("x", "y,z", ' "quoted" ', "a=b", "\\", "日本")),
        base_digest="sha256:00",
        server_round=4,
        learning_rate=0.1,
        proximal_mu=0.5,
    )
    config = plan.to_config()
    # What a Flower ConfigRecord carries: scalars, and lists of strings.
    assert all(
        isinstance(v, int | float | str | bool)
        or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        for v in config.values()
    )
    assert config["spec.labels"] == list(plan.spec.labels)  # a list, never a joined string
    assert TrainPlan.from_config(config) == plan


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch-size=0"),
        ({"learning_rate": -1.0}, "learning-rate=-1.0"),
        ({"local_epochs": 0, "local_steps": 0}, "one of them must be >= 1"),
        ({"surprise": 1}, "unknown fields \\['surprise'\\]"),
        ({"spec.labels": "not json"}, "spec.labels is not a list of strings"),
        ({"spec.labels": "a,b"}, "spec.labels is not a list of strings"),
        ({"spec.labels": ["a", 3]}, "spec.labels is not a list of strings"),
    ],
)
def test_bad_plan_is_refused_by_the_site(change: dict, message: str) -> None:
    config = TrainPlan(spec=ModelSpec(labels=("a", "b")), base_digest="d").to_config() | change
    with pytest.raises(ConfigError, match=message):
        TrainPlan.from_config(config)
