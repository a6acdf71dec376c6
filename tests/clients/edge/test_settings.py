"""Edge settings: a model reference names any model MLflow accepts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from clients.edge.settings import EdgeSettings, ModelRef
from clients.task.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "name", "alias"),
    [
        ("intents", "intents", "production"),
        ("intents@candidate", "intents", "candidate"),
        ("team@site@production", "team@site", "production"),  # MLflow aliases hold no '@'
        ('it\'s, "odd" = 100%@canary', 'it\'s, "odd" = 100%', "canary"),
    ],
)
def test_a_model_reference_splits_at_the_last_at(text: str, name: str, alias: str) -> None:
    assert ModelRef.parse(text) == ModelRef(name, alias)


@pytest.mark.parametrize("text", ["", "@production", "intents@", "a/b"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="must be NAME or NAME@ALIAS"):
        ModelRef.parse(text)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_a_refresh_timeout_must_be_a_positive_number_of_seconds(
    tmp_path: Path, value: float
) -> None:
    with pytest.raises(ConfigError, match=r"--refresh-timeout-s .* must be > 0"):
        EdgeSettings(
            models=(ModelRef("intents"),),
            trust=tmp_path,
            cache=tmp_path / "cache",
            registry_uri="http://127.0.0.1:5000",
            refresh_timeout_s=value,
        )
