"""The process harness on small real child processes: readiness, failure reports, stop."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from server.harness.flower import config_arg, toml_value
from server.harness.process import HarnessError, ManagedProcess, free_port, port_open


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
