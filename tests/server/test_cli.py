"""The ``fedlora`` parser tree: every option of every subcommand explains itself."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import build_parser

# The entry points of pyproject.toml add site, data, keys, registry and edge.
ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"train", "demo", "site", "data", "keys", "registry", "edge", "federation"}


def _walk(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def _arguments() -> list[tuple[str, argparse.Action]]:
    out = []
    for path, parser in _walk(build_parser(), "fedlora"):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            out.append((f"{path} {name}", action))
    return out


ARGUMENTS = _arguments()


def test_the_walk_reaches_every_command_and_entry_point_command() -> None:
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(top.choices) == COMMANDS
    assert any(path.startswith("fedlora edge serve --port") for path, _ in ARGUMENTS)
    assert any(path.startswith("fedlora registry promote --alias") for path, _ in ARGUMENTS)


@pytest.mark.parametrize(("path", "action"), ARGUMENTS, ids=[p for p, _ in ARGUMENTS])
def test_every_argument_has_help_that_states_its_default(
    path: str, action: argparse.Action
) -> None:
    assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, path
    default = action.default
    if default is None or default is False or default == [] or default is argparse.SUPPRESS:
        return
    # Either argparse fills it in, or the text says "default" and names the value.
    states = "%(default)s" in action.help or (
        "default" in action.help and str(default) in action.help
    )
    assert states, f"{path}: help {action.help!r} does not state the default {default!r}"


def test_every_help_page_renders() -> None:
    for path, parser in _walk(build_parser(), "fedlora"):
        assert parser.format_help(), path  # a stray % in a help text would raise here


@pytest.mark.integration  # a real subprocess that waits out a hung thread: seconds
@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [("KeyboardInterrupt", 130, "interrupted"), ("Terminated", 143, "terminated")],
)
def test_an_interrupted_command_exits_130_or_143_though_a_library_thread_hangs(
    raised: str, code: int, said: str
) -> None:
    # Arrange: a command that leaves a non-daemon thread blocked for good, as Flower's
    # simulation workers can stay in ray.get after Ctrl-C, then is interrupted.
    script = textwrap.dedent(
        f"""
        import sys, threading
        from server import cli
        from clients.task.interrupt import Terminated

        def hang_then_interrupt(args):
            threading.Thread(target=threading.Event().wait).start()
            raise {raised}("what was kept")

        cli.THREAD_GRACE_SECONDS = 0.5
        cli.cmd_demo = hang_then_interrupt
        sys.exit(cli.main(["demo"]))
        """
    )

    # Act
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    # Assert: the interpreter did not wait for the thread at exit
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip() == f"{said}: what was kept"
    assert time.monotonic() - started < 30


@pytest.mark.integration  # a real subprocess that waits out a hung thread: seconds
@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [("KeyboardInterrupt", 130, "interrupted"), ("Terminated", 143, "terminated")],
)
def test_an_interrupted_command_leaves_without_the_interpreter_s_shutdown(
    raised: str, code: int, said: str
) -> None:
    # A real SIGTERM of `fedlora train` crashed (SIGSEGV) in 3 of 10 runs after it said
    # "terminated", while the interpreter shut down under the threads Ray and an abandoned
    # round loop left running. That crash cannot be caused on purpose; an exit hook that
    # crashes stands in for it: it runs only if the interpreter shuts down.
    script = textwrap.dedent(
        f"""
        import atexit, os, signal, sys
        from server import cli
        from clients.task.interrupt import Terminated

        def interrupted(args):
            atexit.register(os.kill, os.getpid(), signal.SIGSEGV)
            raise {raised}("what was kept")

        cli.cmd_demo = interrupted
        sys.exit(cli.main(["demo"]))
        """
    )

    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip() == f"{said}: what was kept"


@pytest.mark.integration  # waits out a real grace period or signal: seconds
def test_sigterm_during_the_demo_unwinds_and_exits_143(tmp_path: Path) -> None:
    # The demo's own work is replaced by one that gets `kill PID` (the real one trains for
    # minutes; tests/integration/test_simulation.py sends SIGTERM to a real training run).
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        import server.demo
        from server import cli

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a service manager starts it

        def terminated_mid_run(**_):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                print("unwound", file=sys.stderr)  # finally clauses run: files stay whole

        server.demo.run_demo = terminated_mid_run
        sys.exit(cli.main(["demo", "--out", sys.argv[1]]))
        """
    )

    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines() == ["unwound", "terminated"]


@pytest.mark.integration  # a real subprocess and signal: seconds
@pytest.mark.parametrize("command", ["enroll", "revoke"])
def test_sigterm_during_enroll_or_revoke_says_what_is_left_and_exits_143(
    tmp_path: Path, command: str
) -> None:
    # `kill PID` while the `flwr` call to the SuperLink runs (the call is replaced by one
    # that gets the signal; tests/server/test_federation.py drives the same paths on a
    # fake SuperLink): the command must unwind and name what is left to do, not die.
    script = textwrap.dedent(
        """
        import os, signal, sys, time
        from pathlib import Path
        from server import cli, federation
        from server.federation import init_federation

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a service manager starts it
        fed = init_federation(Path(sys.argv[1]), address="127.0.0.1:9092", sans=[])
        if sys.argv[2] == "revoke":  # "a" enrolled as node 7, as enroll would write it
            from server.roster import Roster
            Roster().enrol("a", node_id=7, public_key="sha256:x").save(fed.roster_path)

        def terminated_mid_call(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        federation.Federation.flwr = terminated_mid_call
        sys.exit(cli.main(["federation", sys.argv[2], "a", "--federation", sys.argv[1]]))
        """
    )

    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "fed"), command],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.startswith("terminated"), proc.stderr
    assert "Traceback" not in proc.stderr
    if command == "revoke":
        assert "flwr supernode unregister 7" in proc.stderr


def test_an_error_naming_a_value_with_markup_prints_it_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A path (or any value an error names) holding "[/red]" broke rich's markup: a
    # MarkupError traceback instead of the error line.
    from server.cli import EXIT_ERROR, main

    missing = tmp_path / "sites[/red][bold]"
    args = ["train", "--sites", str(missing), "--rounds", "1", "--out", str(tmp_path / "o")]
    assert main(args) == EXIT_ERROR
    assert "sites[/red][bold]' is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("state", ["{not json", '{"completed_round": 1e400}', "[" * 100_000])
def test_ctrl_c_with_an_unreadable_checkpoint_is_still_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    # Reading the checkpoint's round to report it must not turn Ctrl-C into an error
    # (exit 2), which would skip the interrupted exit.
    import server.train
    from server.cli import build_parser

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server.train, "run_train", interrupted)
    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint" / "state.json").write_text(state)
    args = build_parser().parse_args(
        ["train", "--sites", str(tmp_path), "--rounds", "2", "--out", str(tmp_path / "out")]
    )
    with pytest.raises(KeyboardInterrupt, match=r"checkpoint in .* is unreadable"):
        args.func(args)


@pytest.mark.parametrize(
    "metrics_of", [None, "run", "an-earlier-run"], ids=["none", "this-run", "an-earlier-run"]
)
def test_ctrl_c_after_the_last_round_advises_what_finishes_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics_of: str | None
) -> None:
    # Every round checkpointed: --resume writes the outputs, unless metrics.json (written
    # last) of this run says they are done, when only a publish can be unfinished; an
    # earlier run's in the same OUT says nothing.
    import server.train
    from server.cli import build_parser

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server.train, "run_train", interrupted)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's store: OUT/mlflow.db
    out = tmp_path / "my out"  # the command said is shell-quoted
    key = tmp_path / "k.pem"
    key.write_text("")
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text('{"completed_round": 2, "run_id": "run"}')
    if metrics_of:
        (out / "metrics.json").write_text(
            f'{{"rounds": [{{"round": 1}}, {{"round": 2}}], "mlflow_run_id": "{metrics_of}"}}'
        )
    args = build_parser().parse_args(
        ["train", "--sites", str(tmp_path), "--rounds", "2", "--out", str(out),
         "--set", "registry.model-name=m", "--set", f"registry.signing-key={key}",
         "--set", "registry.alias=staging"]
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt) as stopped:
        args.func(args)

    said = str(stopped.value)
    if metrics_of == "run":
        registry = f"sqlite:///{out.resolve() / 'mlflow.db'}"  # the run's tracking store
        command = shlex.join(
            ["fedlora", "registry", "publish", str(out), "--model", "m", "--key", str(key),
             "--alias", "staging", "--registry", registry]
        )  # fmt: skip
        assert said == (
            f"the run's outputs in {out} are complete; if it was publishing, "
            f"`{command}` finishes that"
        )
    else:
        assert "holds all 2 rounds" in said
        assert said.endswith(
            "run the same command with --resume to finish them (no round runs again)"
        )
