"""Stop a dead parent's process groups: the harness's last line of defence against orphans.

Run as a script (stdlib only, ``python -I reaper.py``) by `server.harness.process`, which
starts one per harness process and keeps the write end of its stdin. The harness writes
``+PGID`` when it starts a service in a process group of its own and ``-PGID`` once it has
stopped that group. When the harness process dies in any way, SIGKILL included, the
kernel closes its end of the pipe, this script reads end-of-file, and it stops every group
still registered: SIGTERM, then SIGKILL to what is left after `GRACE_SECONDS`. A line
``exit`` ends it without touching anything.

Without it a SIGKILLed ``fedlora demo`` or test session left its SuperLink, SuperNodes,
MLflow server and edge node running, holding their ports.

Why a pipe rather than Linux's ``PR_SET_PDEATHSIG``: the kernel sends that signal when the
*thread* that started the child exits, not the process, it reaches only the direct child
(not an MLflow server's workers), and it exists only on Linux.

Limits: a group is identified by its number. Linux never hands out a number that is still
some group's id, so while any member lives the number is ours; only if every member died
without the harness noticing, and a new process then became leader of a group with the
same number, could the final SIGTERM reach a stranger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

GRACE_SECONDS = 5.0
POLL_SECONDS = 0.1


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member (one we may not signal counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pgids: set[int], signum: int) -> None:
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def stop_groups(pgids: set[int], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    _signal(pgids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(p) for p in pgids):
        time.sleep(POLL_SECONDS)
    _signal({p for p in pgids if group_alive(p)}, signal.SIGKILL)


def main() -> int:
    """Read registrations from stdin until ``exit`` (return) or end-of-file (stop groups)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the harness, not us
    own = os.getpgid(0)
    groups: set[int] = set()
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            return 0
        if len(command) < 2 or command[0] not in "+-" or not command[1:].isdigit():
            continue  # nothing but the harness writes here; ignore what it never sends
        pgid = int(command[1:])
        if pgid <= 1 or pgid == own:
            continue
        if command[0] == "+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    stop_groups(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
