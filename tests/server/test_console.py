"""`RoundProgress`: a live bar on a terminal, one plain line per round anywhere else."""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console

from server.console import RoundProgress


def _clock(*times: float) -> Callable[[], float]:
    ticks = iter(times)
    return lambda: next(ticks)


def test_without_a_terminal_each_round_is_one_plain_line() -> None:
    # Arrange: a log file, as under nohup, CI or `2> run.log`
    log = io.StringIO()
    out = Console(file=log, width=40)  # narrower than a line: a line must not wrap
    clock = _clock(100.0, 112.9, 3700.0)

    # Act
    with RoundProgress("federated rounds", total=6, out=out, clock=clock) as progress:
        progress.update(1, "acc 0.375, 2 sites, 0 rejected")
        progress.update(2, "acc -, 2 sites, 1 rejected")

    # Assert: elapsed since the start, whole seconds, as the live bar's clock shows it
    assert log.getvalue().splitlines() == [
        "federated rounds: starting 6 round(s)",
        "round 1/6: acc 0.375, 2 sites, 0 rejected, 0:00:12 elapsed",
        "round 2/6: acc -, 2 sites, 1 rejected, 1:00:00 elapsed",
    ]


def test_text_that_looks_like_markup_is_printed_as_is() -> None:
    log = io.StringIO()
    with RoundProgress("[bold]r", total=1, out=Console(file=log), clock=_clock(0, 1)) as p:
        p.update(1, "site [a] refused")

    assert "[bold]r: starting" in log.getvalue()
    assert "site [a] refused" in log.getvalue()


def test_on_a_terminal_the_rounds_are_a_live_bar_not_lines() -> None:
    screen = io.StringIO()
    out = Console(file=screen, force_terminal=True, width=100)

    with RoundProgress("federated rounds", total=6, out=out, clock=_clock(0, 5)) as progress:
        progress.update(1, "acc 0.375, 2 sites, 0 rejected")

    assert progress.live
    assert "round 1/6" not in screen.getvalue()
    assert "1/6 acc 0.375" in screen.getvalue()  # the bar's final frame


def test_a_dumb_terminal_gets_plain_lines() -> None:
    out = Console(file=io.StringIO(), force_terminal=True, _environ={"TERM": "dumb"})

    assert not RoundProgress("federated rounds", total=1, out=out).live
