"""Files and directories that readers never see half-written.

`write_atomic` replaces one file: the data goes to a temporary file in the same directory,
is fsynced, renamed over the target, and the directory is fsynced. A POSIX rename within
a directory replaces the target atomically; the first fsync makes the data durable
before the rename can be, the second makes the rename itself durable. So a crash or
SIGKILL at any point leaves the old or the new file, never a torn one.

`swap_directory` installs a whole directory at a path by two renames (the target aside,
the new directory in) after fsyncing every file of the new one. A failure between the
renames puts the old directory back; a kill between them leaves the old directory
beside the target, and the next call on that target puts it back first. Leftovers of an
interrupted call (a temporary file of a dead writer, a half-copied directory, the old
directory of a finished swap) are removed by the next call on the same target.
`temp_directory` gives the directory to build beside the target, named so that a dead
writer's is removed by the next `write_atomic` or `temp_directory` call on that target.

Usage::

    write_atomic(state_dir / "ledger.json", json.dumps(ledger).encode())
    swap_directory(staging / "adapter", out_dir / "adapter")
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

TMP_SUFFIX = ".tmp"
# Another host's leftover untouched this long is a dead writer's: every writer here
# (a file, a data split, a pulled release) finishes in minutes.
FOREIGN_LEFTOVER_S = 24 * 3600.0


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    The temporary file is ``.<name>.<pid>-<host>.<random>.tmp`` beside ``path``: the same
    directory, so the rename never crosses a file system; the writer's pid and host
    (`writer_tag`), so the next call can tell a dead writer's leftover from a live writer's
    file and remove it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{writer_tag()}.", suffix=TMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def temp_directory(target: Path) -> Path:
    """A new empty directory beside ``target`` to build what `swap_directory` installs there.

    It is named like `write_atomic`'s temporary file, ``.<name>.<pid>-<host>.<random>.tmp``, so
    that the next call on ``target`` removes it if its writer died (killed mid-write)
    while a live writer's is left alone; the caller removes it when done.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(target)
    return Path(
        tempfile.mkdtemp(
            dir=target.parent, prefix=f".{target.name}.{writer_tag()}.", suffix=TMP_SUFFIX
        )
    )


@functools.cache
def _host() -> str:
    """12 hex digits naming this host and PID namespace (a container has its own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux, or no /proc: the host name alone
        namespace = 0
    seen = f"{socket.gethostname()}\0{namespace}".encode()
    return hashlib.sha256(seen).hexdigest()[:12]


def writer_tag() -> str:
    """``<pid>-<host>``: who writes a temporary file, in its name.

    A pid means something only in its own PID namespace: on a directory that two hosts or
    containers share, a live writer elsewhere can have a pid that is free here. So a
    leftover is removed when its host is this one and its pid is dead here, or when it is
    another host's and untouched for `FOREIGN_LEFTOVER_S` (a container's restart is a new
    host: its dead predecessor's leftovers would otherwise stay for ever). Names from before
    the host part, ``<pid>`` alone, are judged by the pid, as they were.
    """
    return f"{os.getpid()}-{_host()}"


def _remove_dead_writers_files(path: Path) -> None:
    """Remove the temporary files and directories of dead writers to ``path`` on this host."""
    pattern = re.compile(
        rf"\.{re.escape(path.name)}\.(\d+)(?:-([0-9a-f]{{12}}))?\.[^.]+{re.escape(TMP_SUFFIX)}"
    )
    for leftover in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        match = pattern.fullmatch(leftover.name)
        if not match:
            continue
        if match.group(2) in (None, _host()):
            if _alive(int(match.group(1))):
                continue
        elif not _untouched_for(leftover, FOREIGN_LEFTOVER_S):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False  # gone already


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def swap_directory(new: Path, target: Path) -> None:
    """Install directory ``new`` at ``target``; readers see the old or the new one, whole.

    ``new`` is renamed into place when it is on ``target``'s file system; otherwise it is
    first copied beside ``target`` (a rename cannot cross file systems) and stays where
    it is. An existing ``target`` directory is replaced and removed; whether it may be
    is the caller's decision (e.g. `registry.pull.check_out`).

    Raises:
        NotADirectoryError: ``target`` is a file or a symbolic link; nothing is changed.
        OSError: If a step fails; ``target`` then still holds the old directory (or
            nothing, if there was none).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    aside, incoming = _aside(target), _incoming(target)
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        # Renamed aside, it would outlive the swap: rmtree removes only directories.
        # Checked before recovery, which could remove what lies beside it.
        raise NotADirectoryError(f"{target} is not a directory; it is left as it is")
    recover_directory(target)
    if _same_file_system(new, target.parent):
        staged = new
    else:
        shutil.copytree(new, incoming)
        staged = incoming
    _fsync_tree(staged)
    if os.path.lexists(target):
        os.rename(target, aside)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(aside, target)
            raise
    else:
        os.rename(staged, target)
    fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_directory(target: Path) -> None:
    """Undo what an interrupted `swap_directory` on ``target`` left behind.

    A kill between its two renames left the old directory aside and no ``target``: it
    is put back. A kill after them left the old directory aside, and a kill while copying
    left a partial copy: both are removed.
    """
    aside, incoming = _aside(target), _incoming(target)
    if aside.exists():
        if os.path.lexists(target):
            shutil.rmtree(aside)
        else:
            os.rename(aside, target)
            fsync_directory(target.parent)
    if incoming.exists():
        shutil.rmtree(incoming)


def _same_file_system(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _incoming(target: Path) -> Path:
    return target.parent / f".{target.name}.incoming"


def _fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory``, children before parents."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_directory(Path(root))
