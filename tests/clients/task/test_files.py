"""The atomic file writer and the directory swap, including crashes between their steps.

A crash between two system calls cannot be caused on purpose in a test, so those tests
make ``os.replace``, ``os.rename`` or ``os.fsync`` raise at the step in question (the
failure we cannot otherwise cause) or lay out on disk what a SIGKILL at that step
leaves, and then check that readers see the old or the new content, never a mix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.task import files
from clients.task.files import recover_directory, swap_directory, write_atomic

OLD = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"old weights"}
NEW = {"adapter_config.json": b'{"r": 16}', "adapter_model.safetensors": b"new weights!"}


def _tree(directory: Path, content: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, data in content.items():
        (directory / name).write_bytes(data)
    return directory


def _content(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p != path)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


class Boom(Exception):
    """Stands for a crash at one step."""


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, name: str, call: int) -> None:
    """Make ``os.<name>`` raise on its ``call``-th use (1-based) and work otherwise."""
    real = getattr(os, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Boom(f"os.{name} call {call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, flaky)


# --- write_atomic ---------------------------------------------------------------------


def test_write_atomic_creates_and_replaces_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert _siblings(path) == []


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_crash_inside_write_atomic_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    path = tmp_path / "ledger.json"
    write_atomic(path, b'{"total": 1.0}')
    _fail_on_call(monkeypatch, step, 1)
    with pytest.raises(Boom):
        write_atomic(path, b'{"total": 2.0, "runs": {}}')
    assert path.read_bytes() == b'{"total": 1.0}'
    assert _siblings(path) == []  # the temporary file went with the failure


def _tag(pid: int) -> str:
    """A writer tag of ``pid`` on this host, as `files.writer_tag` writes it."""
    return f"{pid}-{files.writer_tag().split('-')[1]}"


def test_a_dead_writers_temporary_file_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    dead = tmp_path / f".state.json.{_tag(_dead_pid())}.abc123{files.TMP_SUFFIX}"
    live = tmp_path / f".state.json.{_tag(os.getppid())}.def456{files.TMP_SUFFIX}"
    other = tmp_path / f".other.json.{_tag(_dead_pid())}.abc123{files.TMP_SUFFIX}"
    for leftover in (dead, live, other):
        leftover.write_bytes(b"half")
    write_atomic(path, b"whole")
    assert path.read_bytes() == b"whole"
    assert not dead.exists() and live.exists() and other.exists()


def test_another_hosts_temporary_file_is_left_whatever_its_pid_until_a_day_old(
    tmp_path: Path,
) -> None:
    # A directory two containers share: a pid free here may be a live writer there; after a
    # day untouched it is a dead one's (a restarted container is a new host).
    path = tmp_path / "state.json"
    elsewhere = tmp_path / f".state.json.{_dead_pid()}-0123456789ab.abc123{files.TMP_SUFFIX}"
    stale = tmp_path / f".state.json.{os.getppid()}-0123456789ab.def456{files.TMP_SUFFIX}"
    legacy = tmp_path / f".state.json.{_dead_pid()}.def456{files.TMP_SUFFIX}"  # no host part
    for leftover in (elsewhere, stale, legacy):
        leftover.write_bytes(b"half")
    day_ago = time.time() - files.FOREIGN_LEFTOVER_S - 60
    os.utime(stale, (day_ago, day_ago))
    assert files.writer_tag().split("-")[1] != "0123456789ab"

    write_atomic(path, b"whole")

    assert elsewhere.exists() and not stale.exists() and not legacy.exists()


def test_the_writer_tag_is_the_pid_and_a_host_digest() -> None:
    pid, host = files.writer_tag().split("-")
    assert int(pid) == os.getpid() and len(host) == 12 and int(host, 16) >= 0


def test_temp_directory_removes_dead_writers_directories_and_keeps_live_ones(
    tmp_path: Path,
) -> None:
    # Arrange: what a killed writer left beside the target (a partial file inside), a live
    # writer's directory, and a dead writer's directory for another target.
    target = tmp_path / "sites"
    dead = tmp_path / f".sites.{_tag(_dead_pid())}.abc123{files.TMP_SUFFIX}"
    live = tmp_path / f".sites.{_tag(os.getppid())}.def456{files.TMP_SUFFIX}"
    other = tmp_path / f".other.{_tag(_dead_pid())}.abc123{files.TMP_SUFFIX}"
    for leftover in (dead, live, other):
        leftover.mkdir()
        (leftover / "site-01.jsonl").write_text('{"text": "ha')

    # Act
    made = files.temp_directory(target)

    # Assert
    assert made.is_dir() and not any(made.iterdir())
    assert made.name.startswith(f".sites.{files.writer_tag()}.") and made.name.endswith(".tmp")
    assert not dead.exists() and live.exists() and other.exists()


# --- swap_directory ---------------------------------------------------------------------


def test_swap_installs_a_new_directory_and_replaces_an_old_one(tmp_path: Path) -> None:
    target = tmp_path / "out" / "adapter"
    swap_directory(_tree(tmp_path / "out" / ".a.tmp", OLD), target)
    assert _content(target) == OLD
    staged = _tree(tmp_path / "out" / ".b.tmp", NEW)
    swap_directory(staged, target)
    assert _content(target) == NEW
    assert not staged.exists()  # same file system: renamed, not copied
    assert _siblings(target) == []


def test_swap_from_another_file_system_copies_beside_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tmp_path is one file system; the check that tells them apart is made to say no.
    target = _tree(tmp_path / "out" / "adapter", OLD)
    source = _tree(tmp_path / "download" / "release", NEW)
    monkeypatch.setattr(files, "_same_file_system", lambda a, b: False)
    swap_directory(source, target)
    assert _content(target) == NEW and _content(source) == NEW
    assert _siblings(target) == []


@pytest.mark.parametrize(
    ("step", "call"),
    [
        ("fsync", 1),  # fsyncing the new files
        ("rename", 1),  # moving the old directory aside
        ("rename", 2),  # moving the new directory in
    ],
)
def test_a_failure_inside_the_swap_keeps_the_old_directory_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, call: int
) -> None:
    target = _tree(tmp_path / "adapter", OLD)
    staged = _tree(tmp_path / ".adapter.tmp", NEW)
    _fail_on_call(monkeypatch, step, call)
    with pytest.raises(Boom):
        swap_directory(staged, target)
    assert _content(target) == OLD


def test_a_kill_between_the_renames_is_undone_by_the_next_call(tmp_path: Path) -> None:
    # What a SIGKILL after "old aside" and before "new in" leaves: no target, the old
    # directory aside, the staged one unused.
    target = tmp_path / "adapter"
    _tree(tmp_path / ".adapter.old", OLD)
    recover_directory(target)
    assert _content(target) == OLD
    assert _siblings(target) == []


def test_leftovers_of_a_finished_or_half_copied_swap_go_on_the_next_call(
    tmp_path: Path,
) -> None:
    target = _tree(tmp_path / "adapter", OLD)
    _tree(tmp_path / ".adapter.old", {"stale": b"from the swap before"})
    _tree(tmp_path / ".adapter.incoming", {"adapter_config.json": b"{"})  # half a copy
    swap_directory(_tree(tmp_path / "next", NEW), target)
    assert _content(target) == NEW
    assert _siblings(target) == []


def test_swap_refuses_a_regular_file_at_the_target(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.write_bytes(b"a user's file")
    staged = _tree(tmp_path / ".adapter.tmp", NEW)
    with pytest.raises(NotADirectoryError, match="adapter"):
        swap_directory(staged, target)
    assert target.read_bytes() == b"a user's file"
    assert _siblings(target) == [".adapter.tmp"]


def test_swap_refuses_a_symbolic_link_at_the_target(tmp_path: Path) -> None:
    elsewhere = _tree(tmp_path / "elsewhere", OLD)
    target = tmp_path / "adapter"
    target.symlink_to(elsewhere, target_is_directory=True)
    staged = _tree(tmp_path / ".adapter.tmp", NEW)
    with pytest.raises(NotADirectoryError, match="adapter"):
        swap_directory(staged, target)
    assert target.readlink() == elsewhere and _content(elsewhere) == OLD
    assert _siblings(target) == [".adapter.tmp", "elsewhere"]


def test_a_refused_target_leaves_what_lies_beside_it_too(tmp_path: Path) -> None:
    # The refusal comes before recovery, which would remove an aside next to a link.
    target = tmp_path / "adapter"
    target.symlink_to(_tree(tmp_path / "elsewhere", OLD), target_is_directory=True)
    aside = _tree(tmp_path / ".adapter.old", OLD)
    with pytest.raises(NotADirectoryError, match="adapter"):
        swap_directory(_tree(tmp_path / ".adapter.tmp", NEW), target)
    assert _content(aside) == OLD
