"""The upstream circuit breaker: closed → open → half-open → closed or open for longer."""

from __future__ import annotations

import pytest

from clients.edge.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_open_it_and_a_success_in_between_resets_the_count() -> None:
    breaker = CircuitBreaker(failures=3, backoff_s=5, clock=Clock())

    for success in (False, False, True, False, False):
        assert breaker.allow()
        breaker.record(success=success)
    assert breaker.state == "closed"
    breaker.record(success=False)

    assert breaker.state == "open" and not breaker.allow()
    assert breaker.snapshot()["retry_in_s"] == 5.0


def test_after_the_backoff_one_probe_goes_and_its_success_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, backoff_s=5, clock=clock)
    breaker.record(success=False)
    clock.now += 5

    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record(success=True)
    assert breaker.state == "closed" and breaker.allow()
    assert breaker.snapshot()["backoff_s"] == 5


def test_a_failed_probe_doubles_the_backoff_up_to_the_cap() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, backoff_s=5, max_backoff_s=12, clock=clock)
    breaker.record(success=False)
    backoffs = []
    for _ in range(3):
        clock.now += breaker.snapshot()["backoff_s"]
        assert breaker.allow()
        breaker.record(success=False)
        backoffs.append(breaker.snapshot()["backoff_s"])

    assert backoffs == [10, 12, 12]
    clock.now += 11.9
    assert breaker.state == "open" and breaker.snapshot()["times_opened"] == 4


def test_a_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, backoff_s=1, clock=clock)
    breaker.record(success=False)
    clock.now += 1
    assert breaker.allow()

    breaker.cancel()

    assert breaker.allow()


@pytest.mark.parametrize(("failures", "backoff"), [(0, 1.0), (1, 0.0), (1, 400.0)])
def test_bad_settings_are_refused(failures: int, backoff: float) -> None:
    with pytest.raises(ValueError, match="failures="):
        CircuitBreaker(failures=failures, backoff_s=backoff)
