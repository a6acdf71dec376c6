"""`StoppableGrid`: Ctrl-C ends a wait for replies at once, not after round-timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from types import SimpleNamespace

import pytest

from server.simulation import POLL_SECONDS, StoppableGrid


class PendingGrid:
    """Push/pull of a Grid whose sites answer only the messages listed in ``answers``."""

    def __init__(self, answers: Iterable[str] = ()) -> None:
        self.answers = set(answers)
        self.pulls = 0

    def push_messages(self, messages: Iterable[str]) -> Iterable[str]:
        return list(messages)  # a message here is its own id

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[SimpleNamespace]:
        self.pulls += 1
        ready = self.answers & set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]


def _grid(inner: PendingGrid, stop: threading.Event) -> StoppableGrid:
    return StoppableGrid(inner, stop)  # type: ignore[arg-type]


def test_replies_come_back_as_from_flowers_grid() -> None:
    # Arrange
    grid = _grid(PendingGrid(answers={"a", "b"}), threading.Event())

    # Act
    replies = grid.send_and_receive(["a", "b"], timeout=5)  # type: ignore[list-item]

    # Assert
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]


def test_a_silent_site_is_waited_for_until_the_timeout_only() -> None:
    inner = PendingGrid(answers={"a"})
    grid = _grid(inner, threading.Event())

    started = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=0.3)  # type: ignore[list-item]

    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - started < 0.3 + 5 * POLL_SECONDS
    assert inner.pulls >= 2


def test_stop_ends_a_wait_for_replies_at_once() -> None:
    stop = threading.Event()
    grid = _grid(PendingGrid(), stop)
    threading.Timer(0.2, stop.set).start()

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        grid.send_and_receive(["a"], timeout=600)  # type: ignore[list-item]

    assert time.monotonic() - started < 0.2 + 5 * POLL_SECONDS


def test_a_stopped_grid_refuses_every_call_to_the_sites() -> None:
    stop = threading.Event()
    grid = _grid(PendingGrid(answers={"a"}), stop)
    assert list(grid.get_node_ids()) == [1, 2]

    stop.set()

    for call in (
        grid.get_node_ids,
        lambda: grid.push_messages(["a"]),  # type: ignore[list-item]
        lambda: grid.pull_messages(["a"]),
        lambda: grid.send_and_receive(["a"], timeout=5),  # type: ignore[list-item]
    ):
        with pytest.raises(KeyboardInterrupt):
            call()
