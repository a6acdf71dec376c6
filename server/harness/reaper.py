"""Stop a dead parent's process groups: the harness's last line of defence against orphans.

Run as a script (stdlib only, ``python -I reaper.py``) by `server.harness.process`, which
starts one per harness process and keeps the write end of its stdin. The harness writes
``+PGID START`` when it starts a service in a process group of its own (START: the
leader's start time, `start_time`) and ``-PGID`` once it has stopped that group. When the
harness process dies in any way, SIGKILL included, the kernel closes its end of the pipe,
this script reads end-of-file, and it stops every group still registered: SIGTERM, then
SIGKILL to what is left after `GRACE_SECONDS`. A line ``exit`` ends it without touching
anything.

Without it a SIGKILLed ``fedlora demo`` or test session left its SuperLink, SuperNodes,
MLflow server and edge node running, holding their ports.

Why a pipe rather than Linux's ``PR_SET_PDEATHSIG``: the kernel sends that signal when the
*thread* that started the child exits, not the process, it reaches only the direct child
(not an MLflow server's workers), and it exists only on Linux.

A group is identified by its number and its leader's start time. Linux never hands out a
number that is still some group's id, so while any member lives the number is ours; once
every member has died (a service that exited on its own, one the harness dropped after a
restart) the number is free, and a new process may lead a group of that number. The
reaper then finds a process with the group's number and another start time, and leaves
that group alone. Without ``/proc`` (not Linux) there is no start time to compare.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

GRACE_SECONDS = 5.0
POLL_SECONDS = 0.1


def _stat(path: str) -> list[bytes]:
    """The fields after the name in a ``/proc`` stat file (the name may hold ")"): field
    3 (state) first. Empty if the file is gone or unreadable."""
    try:
        with open(path, "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def start_time(pid: int) -> str | None:
    """Process `pid`'s start time (``/proc/PID/stat`` field 22), or None if unknown."""
    fields = _stat(f"/proc/{pid}/stat")
    try:
        return fields[19].decode()
    except (IndexError, UnicodeDecodeError):
        return None


def ours(pgid: int, start: str | None) -> bool:
    """Whether group `pgid` is still the one registered with leader start time `start`.

    A process numbered `pgid` that started at another time means the number was reused:
    our group has no member left (the number would not have been handed out otherwise).
    """
    if start is None:
        return True  # nothing to compare with
    now = start_time(pgid)
    return now is None or now == start


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie (one we may not
    signal counts). A group seen in ``/proc`` to hold only zombies is dead: its members
    wait only for their parent to reap them, and waiting out `GRACE_SECONDS` for them
    would gain nothing. Whatever ``/proc`` cannot show counts as alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True  # no /proc (not Linux): no states to read
    group, zombies = str(pgid).encode(), 0
    for pid in pids:
        fields = _stat(f"/proc/{pid}/stat")  # empty once it exited meanwhile
        if len(fields) < 3 or fields[2] != group:
            continue
        if fields[0] != b"Z" or _threads_running(pid):
            return True
        zombies += 1
    # The kernel counts the group but /proc showed none of it (hidepid, another pid
    # namespace, a member forked during the scan): alive, as without /proc.
    return zombies == 0


def _threads_running(pid: str) -> bool:
    """Whether process `pid` has a thread that is not a zombie. A leader thread that ended
    itself only (not the process) shows Z in ``/proc/PID/stat`` while the others run on."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False  # reaped meanwhile
    states = (_stat(f"/proc/{pid}/task/{tid}/stat")[:1] for tid in tids)
    return any(state and state[0] != b"Z" for state in states)  # [] : exited meanwhile


def _signal(pgids: set[int], signum: int) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def stop_groups(groups: dict[int, str | None], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every group that is still `ours`, wait up to ``grace`` seconds, then SIGKILL
    what is left (``groups``: process group id -> its leader's start time, if known)."""

    def live() -> set[int]:
        return {p for p, start in groups.items() if ours(p, start) and group_alive(p)}

    _signal(live(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and live():
        time.sleep(POLL_SECONDS)
    _signal(live(), signal.SIGKILL)


def main() -> int:
    """Read registrations from stdin until ``exit`` (return) or end-of-file (stop groups)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the harness, not us
    own = os.getpgid(0)
    groups: dict[int, str | None] = {}
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            return 0
        number, _, start = command[1:].partition(" ")
        if command[:1] not in ("+", "-") or not number.isdigit():
            continue  # nothing but the harness writes here; ignore what it never sends
        if start and not start.isdigit():
            continue
        pgid = int(number)
        if pgid <= 1 or pgid == own:
            continue
        if command[0] == "+":
            groups[pgid] = start or None
        else:
            groups.pop(pgid, None)
    stop_groups(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
