"""SIGTERM unwinds as `Terminated`, a KeyboardInterrupt, only where it is at its default."""

from __future__ import annotations

import signal
import threading

import pytest

from clients.task.interrupt import Terminated, at_default, terminate_as_interrupt, watch_signals


@pytest.fixture
def sigterm_restored():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_inside_raises_terminated_and_the_default_comes_back(sigterm_restored) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    with pytest.raises(Terminated), terminate_as_interrupt():
        signal.raise_signal(signal.SIGTERM)

    assert issubclass(Terminated, KeyboardInterrupt)  # the same clauses unwind it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_or_foreign_sigterm_handler_is_left_alone(sigterm_restored) -> None:
    def foreign(signum: int, frame: object) -> None:
        pass

    for handler in (signal.SIG_IGN, foreign):
        signal.signal(signal.SIGTERM, handler)
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is handler
            signal.raise_signal(signal.SIGTERM)  # ignored, or the foreign handler's: no raise


def test_only_the_main_thread_handles_signals() -> None:
    found: list[bool] = []
    thread = threading.Thread(target=lambda: found.append(at_default(signal.SIGINT)))
    thread.start()
    thread.join()

    assert found == [False]


def test_a_signal_is_seen_though_a_library_replaced_the_handler() -> None:
    # As ray.init puts its own SIGTERM handler in place of fedlora's; SIGUSR1 stands in
    # for SIGTERM here, so that a miss cannot end the test session.
    seen = threading.Event()
    got: list[int] = []

    def callback(signum: int) -> None:
        got.append(signum)
        seen.set()

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # the library's
    try:
        with watch_signals(callback):
            signal.raise_signal(signal.SIGUSR1)
            assert seen.wait(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert got == [signal.SIGUSR1]
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd is given back
