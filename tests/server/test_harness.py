"""The process harness on small real child processes: readiness, failure reports, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from server.harness.flower import config_arg, toml_value, write_cli_connection
from server.harness.process import HarnessError, ManagedProcess, free_port, port_open

ROOT = Path(__file__).resolve().parents[2]


def _python(tmp_path: Path, name: str, code: str) -> ManagedProcess:
    return ManagedProcess.start(
        name,
        [sys.executable, "-u", "-c", textwrap.dedent(code)],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / f"{name}.log",
    )


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_wait_ready_returns_once_the_port_opens_and_stop_ends_it(tmp_path: Path) -> None:
    port = free_port()
    code = f"""
        import socket, time
        time.sleep(0.3)
        s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
        time.sleep(60)
    """
    with _python(tmp_path, "server", code) as process:
        process.wait_ready(lambda: port_open(port), timeout=20, what="listening")
        assert process.alive
    assert not process.alive and not port_open(port)


def test_a_process_that_exits_first_is_reported_with_its_code_and_log(tmp_path: Path) -> None:
    process = _python(tmp_path, "crasher", "print('bad flag --frobnicate'); raise SystemExit(3)")
    with pytest.raises(HarnessError) as caught:
        process.wait_ready(lambda: False, timeout=20, what="listening")
    message = str(caught.value)
    assert "crasher exited with code 3 before listening" in message
    assert "bad flag --frobnicate" in message


def test_of_processes_started_side_by_side_the_first_to_exit_fails_the_wait_at_once(
    tmp_path: Path,
) -> None:
    # The first process is still loading; the second has crashed. The wait must not sit
    # out the first one's timeout before it looks at the second.
    from server.harness.process import wait_all_ready

    with (
        _python(tmp_path, "loading", "import time; time.sleep(60)") as loading,
        _python(tmp_path, "crasher", "print('bad flag'); raise SystemExit(3)") as crasher,
    ):
        started = time.monotonic()
        with pytest.raises(HarnessError) as caught:
            wait_all_ready(
                [(loading, lambda: False, "listening"), (crasher, lambda: False, "listening")],
                timeout=30,
            )
        assert time.monotonic() - started < 10
    assert "crasher exited with code 3 before listening" in str(caught.value)
    assert "bad flag" in str(caught.value)


def test_a_process_not_ready_in_time_is_reported_with_its_log(tmp_path: Path) -> None:
    code = "import time; print('still loading the model'); time.sleep(60)"
    with _python(tmp_path, "slow", code) as process:
        started = time.monotonic()
        with pytest.raises(HarnessError) as caught:
            process.wait_ready(lambda: False, timeout=1.0, what="listening")
        assert time.monotonic() - started < 10
        assert "slow was not listening within 1 s" in str(caught.value)
        assert "still loading the model" in str(caught.value)


def test_stop_also_kills_an_orphan_left_in_the_process_group(tmp_path: Path) -> None:
    # The parent starts a grandchild and exits at once: the grandchild can no longer be
    # traced through the parent, only found through the process group.
    pid_file = tmp_path / "grandchild.pid"
    code = f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
    """
    process = _python(tmp_path, "parent", code)
    process.popen.wait(timeout=20)
    grandchild = int(pid_file.read_text())
    assert not _gone(grandchild)
    process.stop(timeout=5)
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)


# A service that starts a child in its own group, prints the child's pid, and waits.
SERVICE = """import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)"""

# A harness process, as `fedlora demo` or a test session is: it starts SERVICE and
# writes "SERVICE_PID GRANDCHILD_PID" to argv[1], then waits to be killed.
HARNESS = """import sys, time
from pathlib import Path
from server.harness.process import ManagedProcess
pids, log, service = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
process = ManagedProcess.start(
    "service", [sys.executable, "-u", "-c", service], env={"PATH": "/usr/bin:/bin"},
    log_path=log,
)
while not log.read_text().strip():
    time.sleep(0.05)
pids.write_text(f"{process.popen.pid} {log.read_text().strip()}")
time.sleep(120)"""


def _sigkill_harness(argv: list[str], pids: Path, *, count: int) -> list[int]:
    """Start the harness process ``argv``, wait until it has written the ``count`` pids of
    what it started to ``pids``, SIGKILL it, and return those still running 20 s later.

    Whatever the test started is killed before returning, the harness's forked child too.
    """
    parent = subprocess.Popen(argv, cwd=ROOT)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and len(pids.read_text().split()) == count):
            assert parent.poll() is None and time.monotonic() < deadline, "harness failed"
            time.sleep(0.1)
        started = [int(x) for x in pids.read_text().split()]
        assert not any(_gone(pid) for pid in started)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while not all(_gone(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid in started if not _gone(pid)]
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in started:
            if not _gone(pid):
                psutil.Process(pid).kill()
        for proc in psutil.process_iter(["cmdline"]):  # a forked child, if any
            with contextlib.suppress(psutil.Error):
                if str(pids) in " ".join(proc.info["cmdline"] or []):
                    proc.kill()


def test_a_sigkilled_harness_leaves_no_service_behind(tmp_path: Path) -> None:
    # SIGKILLed, the harness can stop nothing itself: its reaper must stop the service's
    # whole group, the grandchild included.
    pids = tmp_path / "pids"
    argv = [sys.executable, "-c", HARNESS, str(pids), str(tmp_path / "service.log"), SERVICE]
    assert _sigkill_harness(argv, pids, count=2) == []


def test_start_names_a_missing_executable(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="cannot start ghost"):
        ManagedProcess.start(
            "ghost", [str(tmp_path / "no-such-binary")], env={}, log_path=tmp_path / "g.log"
        )


@pytest.mark.parametrize(
    ("value", "toml"),
    [(True, "true"), (3, "3"), (0.5, "0.5"), ("a b", "'a b'"), ("it's", '"it\'s"')],
)
def test_config_values_render_as_toml(value: str | int | float | bool, toml: str) -> None:
    assert toml_value(value) == toml


def test_config_arg_joins_pairs_and_refuses_both_quotes() -> None:
    assert config_arg({"data-path": "/d/s.jsonl", "n": 2}) == "data-path='/d/s.jsonl' n=2"
    with pytest.raises(ValueError, match="cannot pass"):
        toml_value('it\'s "quoted"')


def test_a_list_is_refused_and_a_label_set_travels_as_its_toml_array_string() -> None:
    """A Python list rendered with quotes inside was cut by Flower's key=value splitter
    (labels='[' reached the ServerApp); `federation local` passes the array string."""
    from flwr.common.config import parse_config_args

    from clients.task.labels import format_label_set, parse_label_set

    with pytest.raises(TypeError, match="not a scalar"):
        toml_value(["a", "b"])  # type: ignore[arg-type]
    labels = ["billing, refunds", "it's", 'say "hi"']
    arg = config_arg({"labels": format_label_set(labels), "num-server-rounds": 2})
    parsed = parse_config_args([arg])
    assert list(parse_label_set(parsed["labels"])) == labels and parsed["num-server-rounds"] == 2


def test_the_cli_connection_holds_an_absolute_escaped_path_flower_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a relative path through a directory whose name needs escaping in TOML.
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.chdir(tmp_path)
    awkward = 'fed "one" \\ two'
    # Act
    write_cli_connection(
        Path("home"), "fedlora", address="127.0.0.1:9092", root_certificates=Path(awkward, "ca.pem")
    )
    # Assert: Flower parses it and gets the absolute path (it refuses a relative one).
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    connection = read_superlink_connection("fedlora")
    assert connection.root_certificates == str(tmp_path.resolve() / awkward / "ca.pem")
    assert connection.address == "127.0.0.1:9092" and not connection.insecure


REAPER = ROOT / "server" / "harness" / "reaper.py"


def _reap(lines: list[str]) -> None:
    """Run the reaper, register `lines`, then close its pipe as a dying harness would."""
    reaper = subprocess.Popen([sys.executable, "-I", str(REAPER)], stdin=subprocess.PIPE)
    assert reaper.stdin is not None
    reaper.stdin.write("".join(f"{line}\n" for line in lines).encode())
    reaper.stdin.close()
    assert reaper.wait(timeout=30) == 0


def test_the_reaper_leaves_a_reused_group_number_alone() -> None:
    # A registered service died and its number went to a stranger that leads a group of
    # its own: the reaper sees another start time and must not signal that group.
    from server.harness.reaper import start_time

    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        start = start_time(stranger.pid)
        assert start is not None
        _reap([f"+{stranger.pid} {int(start) - 1}"])  # our leader started earlier
        assert stranger.poll() is None
        _reap([f"+{stranger.pid} {start}"])  # the registered leader itself: stopped
        assert stranger.wait(timeout=20) == -signal.SIGTERM
    finally:
        stranger.kill()
        stranger.wait()


def test_a_group_of_zombies_is_not_alive() -> None:
    # Its members only wait to be reaped: waiting out the reaper's grace for them gains
    # nothing (and cost each stop of an unreaped child five seconds).
    from server.harness.reaper import group_alive

    leader = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert group_alive(leader.pid)
        assert leader.stdin is not None
        leader.stdin.close()  # it exits; unreaped, it stays a zombie of ours
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and group_alive(leader.pid):
            time.sleep(0.05)
        assert not group_alive(leader.pid)
        os.killpg(leader.pid, 0)  # the kernel still counts the group: only the state says
    finally:
        leader.kill()
        leader.wait()


# SYS_exit, which ends the calling thread only (exit() would end every thread).
_SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(os.uname().machine)


@pytest.mark.skipif(_SYS_EXIT is None, reason="SYS_exit number unknown on this machine")
def test_a_group_whose_leader_thread_exited_but_another_runs_is_alive() -> None:
    # /proc/PID/stat shows such a leader as a zombie while its other threads run on:
    # judged dead, the reaper would neither SIGTERM nor SIGKILL it.
    from server.harness.reaper import group_alive

    code = (
        "import ctypes, sys, threading; "
        "threading.Thread(target=sys.stdin.read).start(); "
        f"ctypes.CDLL(None).syscall({_SYS_EXIT}, 0)"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and psutil.Process(leader.pid).status() != "zombie":
            time.sleep(0.05)
        assert psutil.Process(leader.pid).status() == "zombie"  # its leader thread is
        assert leader.poll() is None  # but the process runs on

        assert group_alive(leader.pid)
    finally:
        leader.kill()
        leader.wait()


def test_a_group_proc_does_not_show_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc mounted with hidepid, or another pid namespace, hides the members the kernel
    # still counts (faked here: this machine's /proc shows everything). The group must not
    # read as dead, or the reaper would leave it running.
    from server.harness import reaper

    leader = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        monkeypatch.setattr(reaper.os, "listdir", lambda path: [])
        assert reaper.group_alive(leader.pid)
    finally:
        leader.kill()
        leader.wait()


def test_stop_leaves_alone_a_group_whose_number_was_reused(tmp_path: Path) -> None:
    # A service that exited on its own and was reaped (`alive` polls) frees its number;
    # `stop` must not SIGTERM the group a stranger now leads under it.
    from types import SimpleNamespace

    from server.harness.reaper import start_time

    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        start = start_time(stranger.pid)
        assert start is not None
        reaped = SimpleNamespace(
            pid=stranger.pid, returncode=0, poll=lambda: 0, wait=lambda timeout: 0
        )
        dead = ManagedProcess(
            "dead", popen=reaped, log_path=tmp_path / "dead.log", start_time=str(int(start) - 1)
        )  # type: ignore[arg-type]
        dead.stop(timeout=1)
        time.sleep(0.5)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


# A harness whose reaper dies (OOM killer, a stray kill) between two services, or that
# forks a long-lived child, then waits to be SIGKILLed. argv: pids file, log dir, mode.
HARNESS_2 = """import os, signal, sys, time
from pathlib import Path
from server.harness.process import ManagedProcess, _Reaper
pids, logs, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def start(name):
    return ManagedProcess.start(name, [sys.executable, "-c", "import time; time.sleep(120)"],
                                env={"PATH": "/usr/bin:/bin"}, log_path=logs / f"{name}.log")
first = start("first")
started = [first.popen.pid]
if mode == "reaper-killed":
    os.kill(_Reaper._popen.pid, signal.SIGKILL)
    _Reaper._popen.wait()
    started.append(start("second").popen.pid)
elif mode == "forked" and os.fork() == 0:  # e.g. multiprocessing's default start method
    time.sleep(120)
    os._exit(0)
pids.write_text(" ".join(map(str, started)))
time.sleep(120)"""


@pytest.mark.parametrize("mode", ["reaper-killed", "forked"])
def test_a_sigkilled_harness_leaves_no_service_behind_even_if(tmp_path: Path, mode: str) -> None:
    # reaper-killed: the restarted reaper must still know the first service's group.
    # forked: a forked child holds a copy of the pipe's write end; the reaper must still
    # see the harness die.
    pids = tmp_path / "pids"
    argv = [sys.executable, "-c", HARNESS_2, str(pids), str(tmp_path), mode]
    assert _sigkill_harness(argv, pids, count=2 if mode == "reaper-killed" else 1) == []


@pytest.mark.integration  # a real subprocess importing Flower: seconds
def test_the_heartbeat_hook_sets_flowers_interval_and_runs_the_sitecustomize_it_shadows(
    tmp_path: Path,
) -> None:
    from server.harness.flower import write_heartbeat_hook

    hook = write_heartbeat_hook(tmp_path / "hook", 10)
    link = tmp_path / "link"  # the hook's directory again, spelled another way
    link.symlink_to(hook, target_is_directory=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_HOOK_RAN'] = '1'\n")
    code = (
        "import os, flwr.common.constant as c; "
        "print(c.HEARTBEAT_DEFAULT_INTERVAL, os.environ.get('OTHER_HOOK_RAN'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(link), str(other)])},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10", "1"] and "Error" not in done.stderr, done.stderr
