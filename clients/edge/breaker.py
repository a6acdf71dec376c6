"""A circuit breaker for the upstream (Nygard, *Release It!*, 2007, "Circuit Breaker").

``closed``: calls go through; ``failures`` in a row open it. ``open``: no call for the
back-off period. ``half-open``: after the back-off one call (a probe) goes through; its
success closes the breaker and resets the back-off, its failure opens it again for twice
as long, up to ``max_backoff_s`` (exponential back-off).

    breaker = CircuitBreaker(failures=3, backoff_s=5)
    if breaker.allow():
        ok = call()
        breaker.record(success=ok)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int,
        backoff_s: float,
        max_backoff_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or not 0 < backoff_s <= max_backoff_s:
            raise ValueError(
                f"failures={failures} must be ≥ 1 and 0 < backoff_s={backoff_s} "
                f"≤ max_backoff_s={max_backoff_s}"
            )
        self.threshold = failures
        self.base_backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0  # in a row
        self._backoff_s = backoff_s
        self._opened_at = 0.0
        self._probing = False
        self.opened = 0  # times it opened, for /healthz

    @property
    def state(self) -> str:
        with self._lock:
            return self._current()

    def _current(self) -> str:
        if self._state == OPEN and self.clock() - self._opened_at >= self._backoff_s:
            self._state = HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """Whether a call may go now; in half-open only one probe at a time may."""
        with self._lock:
            state = self._current()
            if state == CLOSED:
                return True
            if state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def cancel(self) -> None:
        """An allowed call that was not made after all (e.g. refused by the budget)."""
        with self._lock:
            self._probing = False

    def record(self, *, success: bool) -> None:
        with self._lock:
            state = self._current()
            self._probing = False
            if success:
                self._state, self._failures, self._backoff_s = CLOSED, 0, self.base_backoff_s
                return
            self._failures += 1
            if state == HALF_OPEN:
                self._open(min(self._backoff_s * 2, self.max_backoff_s))
            elif state == CLOSED and self._failures >= self.threshold:
                self._open(self._backoff_s)

    def _open(self, backoff_s: float) -> None:
        self._state, self._backoff_s, self._opened_at = OPEN, backoff_s, self.clock()
        self.opened += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            state = self._current()
            retry = self._backoff_s - (self.clock() - self._opened_at) if state == OPEN else 0.0
            return {
                "state": state,
                "failures_in_a_row": self._failures,
                "backoff_s": self._backoff_s,
                "retry_in_s": round(max(retry, 0.0), 3),
                "times_opened": self.opened,
            }
