"""Edge settings: a model reference names any model MLflow accepts."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from clients.edge.settings import MAX_THREADS, EdgeSettings, ModelRef
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


def _settings(tmp_path: Path, **overrides: object) -> EdgeSettings:
    return EdgeSettings(
        models=(ModelRef("intents"),),
        trust=tmp_path,
        cache=tmp_path / "cache",
        registry_uri="http://127.0.0.1:5000",
        **overrides,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_a_refresh_timeout_must_be_a_positive_number_of_seconds(
    tmp_path: Path, value: float
) -> None:
    with pytest.raises(ConfigError, match=r"--refresh-timeout-s .* must be > 0"):
        _settings(tmp_path, refresh_timeout_s=value)


@pytest.mark.parametrize("field", ["poll_seconds", "refresh_timeout_s"])
@pytest.mark.parametrize("value", [math.inf, 1e300])
def test_a_wait_longer_than_a_thread_can_wait_is_refused(
    tmp_path: Path, field: str, value: float
) -> None:
    # `--poll-seconds inf` (or 1e400, which argparse reads as inf) killed the refresh thread
    # with "OverflowError: timestamp out of range" and every POST /refresh then failed;
    # `--refresh-timeout-s 1e300` failed every refresh with the same error.
    flag = "--" + field.replace("_", "-")
    refused = rf"^{flag} {re.escape(str(value))} must be > 0 and at most "
    with pytest.raises(ConfigError, match=refused):
        _settings(tmp_path, **{field: value})


@pytest.mark.parametrize("threads", [-1, MAX_THREADS + 1, 10**400], ids=["-1", "max+1", "10^400"])
def test_threads_past_what_torch_takes_are_refused(tmp_path: Path, threads: int) -> None:
    # `--threads 1000…0` passed and torch.set_num_threads raised "ValueError: Overflow when
    # unpacking long long" when the node started.
    with pytest.raises(ConfigError, match=rf"^--threads .* must be in 0\.\.{MAX_THREADS}"):
        _settings(tmp_path, threads=threads)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"body_timeout_s": 0.0}, "--body-timeout-s 0.0 must be in (0, 3600]"),
        ({"body_timeout_s": math.inf}, "--body-timeout-s inf must be in (0, 3600]"),
        ({"max_items": 1025}, "--max-items 1025 must be at most 1024"),
    ],
)
def test_body_deadline_connections_and_items_are_bounded(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _settings(tmp_path, **overrides)
