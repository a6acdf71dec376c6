"""Child processes that serve on a loopback port: start, wait until ready, stop the group.

A `ManagedProcess` runs in a session of its own (so it leads its own process group) with
stdout and stderr appended to a log file. `ManagedProcess.wait_ready` polls a readiness
check until it passes, the process exits, or a timeout passes; the error then carries the
tail of the log. `stop_processes` signals every process tree it can trace, then kills
what outlives the grace period and, last, whatever is left in each process group:
descendants whose parent has already died are no longer in the tree, but still in the group.

If the harness process itself dies before it can stop them (SIGKILL, a crash, a CI
timeout), its reaper (`server/harness/reaper.py`, one small process per harness process)
sees its pipe close and stops every group still registered.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import psutil

from clients.task.errors import FedloraError
from server.harness.reaper import group_alive, ours, start_time

LOCALHOST = "127.0.0.1"
# How often readiness is polled: fast enough that a ready process is not kept waiting.
POLL_SECONDS = 0.3


class HarnessError(FedloraError):
    """A harnessed process did not start, exited, or was not ready in time."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on `host` right now.

    The port is released before the caller's process binds it, so another process could
    take it in between; that is rare on one machine, and the start then fails loudly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOCALHOST) -> bool:
    """Whether something accepts TCP connections on `host`:`port`."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_status(url: str) -> int | None:
    """The HTTP status `url` answers with (503 included), or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class _Reaper:
    """This process's reaper: started on first use, told of every group we start and stop.

    The pipe's write end lives only here (subprocess children do not inherit it, and a
    forked child lets go of its copy, `_after_fork`), so the reaper reads end-of-file
    exactly when this process is gone. A reaper that died (OOM killer, a stray kill) is
    replaced on the next call and told every group still registered.
    """

    _lock = threading.Lock()
    _popen: subprocess.Popen[bytes] | None = None
    _pid: int | None = None  # the process that started it: a forked child has none
    # pgid -> its "+PGID START" line, replayed to a replacement reaper (under _lock).
    _registered: ClassVar[dict[int, str]] = {}
    # A forked child's copies of the parent's reaper: never finalized there (another
    # thread may have held their buffer's lock at the fork).
    _inherited: ClassVar[list[subprocess.Popen[bytes]]] = []

    @classmethod
    def _send(cls, line: str) -> None:
        """Write `line` to this process's reaper, starting one if needed (hold _lock)."""
        for _ in range(2):  # a reaper found dead while writing is replaced once
            fresh = cls._popen is None or cls._pid != os.getpid() or cls._popen.poll() is not None
            if fresh:
                cls._popen = subprocess.Popen(
                    [sys.executable, "-I", str(Path(__file__).with_name("reaper.py"))],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,  # a signal to our group must not reach it
                )
                cls._pid = os.getpid()
            assert cls._popen is not None and cls._popen.stdin is not None
            lines = [*cls._registered.values(), line] if fresh else [line]
            try:
                cls._popen.stdin.write("".join(f"{x}\n" for x in lines).encode())
                cls._popen.stdin.flush()
                return
            except OSError:  # the reaper died
                cls._popen = None

    @classmethod
    def _after_fork(cls) -> None:
        """In a forked child: let go of the pipe's write end, or the reaper would also wait
        for this child to exit; the parent's groups stay the parent's."""
        popen, cls._popen, cls._pid = cls._popen, None, None
        cls._lock = threading.Lock()  # another thread may have held it at the fork
        cls._registered = {}
        if popen is not None and popen.stdin is not None:
            cls._inherited.append(popen)
            with contextlib.suppress(OSError, ValueError):
                # Point the number at /dev/null rather than close it: the file object
                # still owns the number and closes it some day.
                devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                os.dup2(devnull, popen.stdin.fileno(), inheritable=False)
                os.close(devnull)

    @classmethod
    def watch(cls, pgid: int, start: str | None) -> None:
        """Stop group `pgid` if this process dies before `forget` is called for it.

        ``start``: its leader's `start_time`, read before the leader can be reaped (its
        number cannot be reused until then); the reaper compares it before it signals.
        """
        line = f"+{pgid} {start or ''}".rstrip()
        with cls._lock:
            cls._registered[pgid] = line
            cls._send(line)

    @classmethod
    def forget(cls, pgid: int) -> None:
        with cls._lock, contextlib.suppress(OSError):
            if cls._registered.pop(pgid, None) is not None:
                cls._send(f"-{pgid}")


os.register_at_fork(after_in_child=_Reaper._after_fork)


class Service:
    """Something the harness starts and stops: ``with`` starts it and always stops it.

    Subclasses give ``start`` (returning the started object) and ``stop`` (safe to call
    more than once).
    """

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class ManagedProcess:
    """A long-running child process whose stdout and stderr go to a log file.

    Use `start` to create one; as a context manager it is stopped on exit.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    # The leader's start time (reaper.start_time), read before it can be reaped: once it
    # is, its number may lead a stranger's group, which `stop` must not signal.
    start_time: str | None = None

    @classmethod
    def start(
        cls, name: str, args: Sequence[str], *, env: Mapping[str, str], log_path: Path
    ) -> ManagedProcess:
        """Start `args` with its output appended to `log_path` (a restart keeps the old log).

        Raises:
            HarnessError: If the executable cannot be started.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            try:
                popen = subprocess.Popen(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=dict(env),
                    # A process group of its own: Ctrl-C in the caller's terminal does not
                    # reach it directly (`stop` decides the shutdown order), and `stop` can
                    # kill the whole group without touching the caller.
                    start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"cannot start {name} ({args[0]}): {exc}") from exc
        started = start_time(popen.pid)
        _Reaper.watch(popen.pid, started)  # its group: stopped even if we are SIGKILLed
        return cls(name=name, popen=popen, log_path=log_path, start_time=started)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the log, for failure reports."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Block until `ready()` is true.

        Args:
            ready: The readiness check, e.g. ``lambda: port_open(port)``.
            timeout: Seconds to wait.
            what: What readiness means, for the error ("listening on 127.0.0.1:9092").

        Raises:
            HarnessError: If the process exits first or `timeout` passes; the message
                ends with the last lines of the log.
        """
        wait_all_ready([(self, ready, what)], timeout=timeout)

    def raise_if_failed(self, *, started: float, timeout: float, what: str) -> None:
        """For a process not yet ready, waited for since ``started`` (`time.monotonic`):
        raises as `wait_ready` does if it has exited or ``timeout`` has passed."""
        if not self.alive:
            raise HarnessError(
                f"{self.name} exited with code {self.popen.returncode} before "
                f"{what}; last lines of {self.log_path}:\n{self.tail(40)}"
            )
        if time.monotonic() > started + timeout:
            raise HarnessError(
                f"{self.name} was not {what} within {timeout:.0f} s; "
                f"last lines of {self.log_path}:\n{self.tail(40)}"
            )

    def tree(self) -> list[psutil.Process]:
        """This process and every descendant now running (empty once it has exited).

        Flower's SuperLink and SuperNode start SuperExec helpers, which start ServerApp
        and ClientApp processes, some in sessions of their own; only while the parent
        lives can they be traced to it.
        """
        if self.popen.poll() is not None:
            return []  # reaped: its pid may already belong to someone else
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process, its descendants and its group; kill what outlives `timeout`."""
        stop_processes([self], timeout)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# A spawned process, its readiness check and what readiness means (`wait_ready`).
Pending = tuple[ManagedProcess, Callable[[], bool], str]


def wait_all_ready(pending: Sequence[Pending], *, timeout: float) -> None:
    """`ManagedProcess.wait_ready` for several processes at once, started side by side.

    Each is looked at on every pass, so the first that exits fails the wait at once,
    naming itself, rather than after another's whole timeout.

    Raises:
        HarnessError: As `wait_ready`, for the first process that exits, or one not ready
            within ``timeout`` seconds.
    """
    started = time.monotonic()
    left = list(pending)
    while left:
        left = [(process, ready, what) for process, ready, what in left if not ready()]
        # One that has exited is named before one that is merely late.
        left.sort(key=lambda item: item[0].alive)
        for process, _, what in left:
            process.raise_if_failed(started=started, timeout=timeout, what=what)
        if left:
            time.sleep(POLL_SECONDS)


def _signal_group(process: ManagedProcess, signum: int) -> None:
    """Send `signum` to the process group `process` leads (started with a new session)."""
    pgid = process.popen.pid
    if pgid == os.getpgid(0) or not ours(pgid, process.start_time):  # never our own group,
        return  # nor one whose number another process leads now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_processes(processes: Sequence[ManagedProcess], timeout: float = 10.0) -> None:
    """SIGTERM every process tree and group, in the given order; SIGKILL what outlives `timeout`.

    All are signalled before any is waited for, so shutdown takes the slowest process's
    time rather than the sum. A process group stays reserved while any member lives, so
    signalling it after its leader exited reaches only our stragglers.
    """
    trees = [proc for process in processes for proc in process.tree()]
    for proc in trees:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    _, survivors = psutil.wait_procs(trees, timeout=timeout)
    for proc in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for process in processes:
        _signal_group(process, signal.SIGKILL)
    psutil.wait_procs(survivors, timeout=5.0)
    for process in processes:
        # Reap our direct children, so they do not linger as zombies.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.popen.wait(timeout=5.0)
        if not group_alive(process.popen.pid):
            _Reaper.forget(process.popen.pid)
