"""Local simulation: every site on this machine, through Flower's Simulation Engine.

The ClientApp is named by its component reference, as pyproject.toml names it for
``flwr run``, so the server package never imports site code.

Ctrl-C or SIGTERM stops the run, not only Ray: the round loop runs on a Grid that raises
`KeyboardInterrupt` at its next call once the run is stopped (instead of waiting up to
``round-timeout`` for sites Ray no longer runs), in a daemon thread, so a round that is
still evaluating or saving cannot keep the process alive after `STOP_GRACE_SECONDS`.
SIGTERM ends `simulate` with `clients.task.interrupt.Terminated`, Ctrl-C with a plain
`KeyboardInterrupt`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.task.choices import SIM_SITES_ENV
from clients.task.interrupt import Terminated, at_default, watch_signals
from server.app import TrainingResult, run_training
from server.record import RoundRecord
from server.settings import RunSettings
from server.tracking import Tracker

if TYPE_CHECKING:
    from flwr.supercore.run import Run

CLIENT_APP = "clients.site.app:app"  # same reference as [tool.flwr.app.components]
# How long Ctrl-C or SIGTERM waits for the round loop to stop by itself: it stops at its
# next Grid call, or after the central evaluation and checkpoint of the round in flight.
STOP_GRACE_SECONDS = 15.0
POLL_SECONDS = 0.1  # how often a stoppable Grid looks for replies (InMemoryGrid's pace)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimSite:
    """A simulated site; ``node_config`` adds SuperNode node-config keys (e.g. max-epsilon).

    Without a ``state-dir`` a simulated site keeps its state (the privacy ledger) in
    ``OUT/site-state/SITE``.
    """

    site_id: str
    data_path: Path
    node_config: Mapping[str, Any] = field(default_factory=dict)


class _HideRunSimulationDeprecation(logging.Filter):
    """Flower 1.41 marks `run_simulation` deprecated in favour of `flwr run`.

    fedlora keeps it for ``fedlora train`` because it runs the ServerApp in this process,
    which gives the progress bar and typed errors; ``flwr run .`` works as well (README).
    The warning would only confuse users of ``fedlora train``, so it is hidden here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


class StoppableGrid(Grid):
    """A Grid whose calls raise `KeyboardInterrupt` once ``stop`` is set.

    ``send_and_receive`` polls for the replies itself, as Flower's InMemoryGrid does, and
    looks at ``stop`` between polls: a stopped run ends at once rather than after
    ``round-timeout`` spent waiting for sites that are gone with Ray.
    """

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid = grid
        self._stop = stop

    def _check(self) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt("the run was stopped")

    def __getattr__(self, name: str) -> Any:  # what a Grid adds to the interface
        return getattr(self._grid, name)

    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        replies: list[Message] = []
        while True:
            got = list(self.pull_messages(pending))  # raises once stopped
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if not pending or time.monotonic() >= deadline:
                return replies
            self._stop.wait(POLL_SECONDS)


class _Hush(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _stop_on_interrupt(stop: threading.Event, *, verbose: bool) -> Iterator[None]:
    """While inside, Ctrl-C or SIGTERM sets ``stop`` at once, then raises as usual.

    Ctrl-C raises `KeyboardInterrupt`, SIGTERM `Terminated`. The round loop then stops at
    its next Grid call while Flower shuts Ray down. Without ``verbose``, Flower's records
    are dropped from then on, also after this block (its workers may still log): they
    are about the actors the signal stopped. Each signal is handled only where
    `clients.task.interrupt.at_default` allows (a background job's ignored Ctrl-C stays
    ignored).

    ``ray.init`` replaces the SIGTERM handler set here with its own, which raises
    ``SystemExit(SIGTERM)`` (`simulate` takes that for SIGTERM too); the run is stopped
    and Flower hushed all the same, by `clients.task.interrupt.watch_signals`.
    """
    handled = [signum for signum in (signal.SIGINT, signal.SIGTERM) if at_default(signum)]
    if not handled:
        yield
        return

    def stopping(signum: int) -> None:
        if signum in handled:
            stop.set()
            _hush_flower(verbose=verbose)

    def interrupted(signum: int, frame: object) -> None:
        stopping(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupted) for signum in handled}
    try:
        with watch_signals(stopping):
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _hush_flower(*, verbose: bool) -> None:
    """Drop Flower's records from now on, unless ``verbose`` (see `_stop_on_interrupt`)."""
    flwr_logger = logging.getLogger("flwr")
    if not verbose and not any(isinstance(f, _Hush) for f in flwr_logger.filters):
        flwr_logger.addFilter(_Hush())


def _wait_for_training(
    training: Sequence[threading.Thread], *, again: str, trackers: Sequence[Tracker]
) -> None:
    """Give the stopped round loop `STOP_GRACE_SECONDS` to end; ``again`` cuts it short.

    Its MLflow run is marked KILLED first (`--resume` reopens it), unless the loop had
    ended it: a service manager may kill the process before the wait is over. The hint
    that ``again`` exits at once is logged before that call to the tracking store. A run
    the loop has not opened yet is marked as it opens (`Tracker.kill_unless_ended`). The
    loop may still end the run its own way during the wait (FINISHED after its last
    round). The thread is a daemon: if it is still busy after the wait, the process exits
    without it, and whatever it had not checkpointed is lost (the previous checkpoint
    stays whole).

    Raises:
        KeyboardInterrupt: ``again`` (a second Ctrl-C or SIGTERM) during the wait.
    """
    ended = False
    tried = 0  # trackers[:tried] had their mark tried: once each, as a second signal
    # must not wait for another call to a slow store (trackers only grows, by append)
    try:
        if any(thread.is_alive() for thread in training):  # said before the MLflow calls
            log.warning(
                "stopping: the round in flight has up to %.0f s to end (%s again: exit now)",
                STOP_GRACE_SECONDS,
                again,
            )
        for tracker in list(trackers):
            tried += 1
            _mark_killed(tracker)
        for thread in training:
            thread.join(STOP_GRACE_SECONDS)
        ended = not any(thread.is_alive() for thread in training)
    finally:  # also when a second signal cuts the wait short (after which is_alive()
        # can say False of a thread still running: CPython 3.11's join, bpo-45274)
        if not ended:
            log.warning("the round in flight did not stop and is abandoned")
            for tracker in trackers[tried:]:  # one the loop registered during the wait
                _mark_killed(tracker)


def _mark_killed(tracker: Tracker) -> None:
    try:
        tracker.kill_unless_ended()
    except Exception as exc:  # the store down: the run stays RUNNING, the exit goes on
        log.warning("could not mark MLflow run %s KILLED: %s", tracker.run_id, exc)


def load_component(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def simulate(
    settings: RunSettings,
    sites: Sequence[SimSite],
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    cpus_per_site: float = 1.0,
    client_app: str = CLIENT_APP,
    verbose: bool = False,
) -> TrainingResult:
    """Run a training run with one simulated SuperNode per site.

    With ``verbose``, the sites' own output (Ray actors' stdout and stderr) is forwarded
    to this process and Flower logs at DEBUG; otherwise a site's failure reaches the run
    only as its error reply, recorded by the round loop.

    Args:
        client_app: The ClientApp's component reference (tests and benchmarks put
            hostile sites in with one that wraps fedlora's).

    Raises:
        FedloraError: Whatever the run raised (bad config, failed round, ...).
    """
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _HideRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_HideRunSimulationDeprecation())

    # Ray's worker processes inherit the environment: keep library deprecation noise out
    # of the user's terminal (fedlora's own errors are logged, not warned).
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    # Ray's C++ core installs a failure signal handler for SIGTERM that, after chaining to
    # the Python handler, aborts the process 3 s later (a core dump, exit 134) while the
    # stopped run is still marking its MLflow run and leaving its checkpoint.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    os.environ[SIM_SITES_ENV] = json.dumps(
        [
            {
                "data-path": str(s.data_path.resolve()),
                "site-id": s.site_id,
                "state-dir": str((settings.out_dir / "site-state" / s.site_id).resolve()),
                **s.node_config,
            }
            for s in sites
        ]
    )
    outcome: dict[str, object] = {}
    stop = threading.Event()
    training: list[threading.Thread] = []
    trackers: list[Tracker] = []
    server_app = ServerApp()

    def train(grid: Grid) -> None:
        try:
            outcome["result"] = run_training(
                StoppableGrid(grid, stop),
                settings,
                on_round=on_round,
                on_tracking=trackers.append,
                stop_requested=stop.is_set,
            )
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        # Flower's ServerApp thread is not a daemon and the interpreter waits for it at
        # exit, so it only watches the round loop, which runs in a daemon thread.
        thread = threading.Thread(target=train, args=(grid,), name="fedlora-rounds", daemon=True)
        training.append(thread)
        thread.start()
        while thread.is_alive() and not stop.is_set():
            thread.join(POLL_SECONDS)

    try:
        with _stop_on_interrupt(stop, verbose=verbose):
            run_simulation(
                server_app=server_app,
                client_app=load_component(client_app),
                num_supernodes=len(sites),
                backend_config={
                    "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
                    "init_args": {"logging_level": logging.ERROR, "log_to_driver": verbose},
                },
                verbose_logging=verbose,
            )
    except KeyboardInterrupt as exc:
        stop.set()
        again = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        _wait_for_training(training, again=again, trackers=trackers)
        raise
    except SystemExit as exc:  # ray.init's own SIGTERM handler (see _stop_on_interrupt)
        if exc.code != signal.SIGTERM:
            raise
        stop.set()
        _hush_flower(verbose=verbose)
        _wait_for_training(training, again="SIGTERM", trackers=trackers)
        raise Terminated from None
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "result" not in outcome:
        raise RuntimeError("the simulation ended without a result (see the Flower log above)")
    return outcome["result"]  # type: ignore[return-value]
