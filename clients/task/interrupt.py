"""Stopping a long command on a signal: Ctrl-C (SIGINT) and SIGTERM unwind alike.

Both raise `KeyboardInterrupt` in the main thread, so the same ``except`` and ``finally``
clauses stop the work and leave its files whole. SIGTERM's is `Terminated`, so a CLI can
say "terminated" and exit 143 (128 + SIGTERM) where Ctrl-C exits 130. A handler is set
only on the main thread (Python's rule) and only where the signal is at its default: an
ignored signal (a background job's SIGINT) and a handler someone else set are left alone.
`watch_signals` sees a signal as it arrives even where a library has since put its own
handler in (``ray.init`` does for SIGTERM).

Usage::

    with terminate_as_interrupt():
        run_train(...)  # SIGTERM raises Terminated in here
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a service manager's stop), unwinding as Ctrl-C does."""


def raise_terminated(signum: int, frame: object) -> NoReturn:
    """SIGTERM's handler inside `terminate_as_interrupt`."""
    raise Terminated


def at_default(signum: int) -> bool:
    """Whether ``signum`` may be handled here: on the main thread, at Python's default.

    SIGINT's default raises `KeyboardInterrupt`; SIGTERM's ends the process, or raises
    `Terminated` inside `terminate_as_interrupt`.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signum)
    if signum == signal.SIGINT:
        return current is signal.default_int_handler
    return current is signal.SIG_DFL or current is raise_terminated


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (where `at_default` allows it)."""
    if not at_default(signal.SIGTERM):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:  # set inside: a SIGTERM as it is set still finds the old handler put back
        signal.signal(signal.SIGTERM, raise_terminated)
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def watch_signals(callback: Callable[[int], None]) -> Iterator[None]:
    """While inside, ``callback(signum)`` runs in a watcher thread as each signal arrives.

    The callback is called whichever Python handler the signal has (a library may have
    put its own in place of fedlora's), and before that handler runs: Python runs signal
    handlers in the main thread only, once it is back in Python code, which takes a while
    when it is busy in C code. The watcher reads each signal's number from the wakeup fd
    (`signal.set_wakeup_fd`), to which Python's C-level handler writes it at once. Signals
    at SIG_DFL or SIG_IGN never reach Python and are not seen. Only on the main thread, and
    only where no one else uses the wakeup fd.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd's requirement
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1:  # someone else's (an asyncio loop's): left to them
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        yield
        return

    def watch() -> None:
        with contextlib.suppress(OSError):  # the read end closed under a late watcher
            while data := os.read(read_end, 64):  # b"" once the write end is closed
                for signum in data:
                    callback(signum)

    watcher = threading.Thread(target=watch, name="fedlora-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(-1)
        os.close(write_end)
        watcher.join(timeout=5)
        with contextlib.suppress(OSError):
            os.close(read_end)
