"""Refreshes off the request path: one thread polls, and on-demand requests coalesce.

``POST /v1/refresh`` never runs a refresh itself: it asks the refresher and waits (without
holding a request thread) for the first refresh that starts after it asked. Every request
that arrives while that refresh is still pending shares it, so a storm of refreshes is at
most one running and one pending refresh, and inference never waits behind them.

    refresher = Refresher(node.refresh_all, poll_seconds=30)
    refresher.start()
    swapped = refresher.request().result()   # {"intents": True}
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)


class Refresher:
    def __init__(self, refresh: Callable[[], dict[str, bool]], *, poll_seconds: float | None):
        self._refresh = refresh
        self._poll = poll_seconds  # None: only on request
        self._lock = threading.Lock()
        self._pending: Future[dict[str, bool]] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedlora-edge-refresh", daemon=True)
        self.runs = 0  # refreshes done (tests and benchmarks read it)

    def start(self) -> None:
        with self._lock:
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)

    def request(self) -> Future[dict[str, bool]]:
        """The result of the next refresh to start; shared by everyone who asks before."""
        self.start()  # an app served without its lifespan still refreshes on request
        with self._lock:
            if self._pending is None:
                self._pending = Future()
                self._wake.set()
            return self._pending

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll)
            if self._stop.is_set():
                break
            with self._lock:
                self._wake.clear()
                waiting, self._pending = self._pending, None
            try:
                result = self._refresh()
            except Exception as exc:  # the loop must outlive any one bad refresh
                log.exception("refresh failed")
                if waiting is not None:
                    waiting.set_exception(exc)
            else:
                if waiting is not None:
                    waiting.set_result(result)
            self.runs += 1
        with self._lock:
            if self._pending is not None:
                self._pending.set_exception(RuntimeError("the node is shutting down"))
