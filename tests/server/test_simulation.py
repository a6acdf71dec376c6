"""`StoppableGrid`: Ctrl-C ends a wait for replies at once, not after round-timeout; a round
loop abandoned after the grace period leaves its MLflow run KILLED, not RUNNING."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import pytest

from server import simulation
from server.simulation import POLL_SECONDS, StoppableGrid, _wait_for_training
from server.tracking import Tracker


class PendingGrid:
    """Push/pull of a Grid whose sites answer only the messages listed in ``answers``."""

    def __init__(self, answers: Iterable[str] = ()) -> None:
        self.answers = set(answers)
        self.pulls = 0

    def push_messages(self, messages: Iterable[str]) -> Iterable[str]:
        return list(messages)  # a message here is its own id

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[SimpleNamespace]:
        self.pulls += 1
        ready = self.answers & set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]


def _grid(inner: PendingGrid, stop: threading.Event) -> StoppableGrid:
    return StoppableGrid(inner, stop)  # type: ignore[arg-type]


def test_replies_come_back_as_from_flowers_grid() -> None:
    # Arrange
    grid = _grid(PendingGrid(answers={"a", "b"}), threading.Event())

    # Act
    replies = grid.send_and_receive(["a", "b"], timeout=5)  # type: ignore[list-item]

    # Assert
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]


def test_a_silent_site_is_waited_for_until_the_timeout_only() -> None:
    inner = PendingGrid(answers={"a"})
    grid = _grid(inner, threading.Event())

    started = time.monotonic()
    replies = grid.send_and_receive(["a", "b"], timeout=0.3)  # type: ignore[list-item]

    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - started < 0.3 + 5 * POLL_SECONDS
    assert inner.pulls >= 2


def test_stop_ends_a_wait_for_replies_at_once() -> None:
    stop = threading.Event()
    grid = _grid(PendingGrid(), stop)
    threading.Timer(0.2, stop.set).start()

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        grid.send_and_receive(["a"], timeout=600)  # type: ignore[list-item]

    assert time.monotonic() - started < 0.2 + 5 * POLL_SECONDS


def test_a_stopped_grid_refuses_every_call_to_the_sites() -> None:
    stop = threading.Event()
    grid = _grid(PendingGrid(answers={"a"}), stop)
    assert list(grid.get_node_ids()) == [1, 2]

    stop.set()

    for call in (
        grid.get_node_ids,
        lambda: grid.push_messages(["a"]),  # type: ignore[list-item]
        lambda: grid.pull_messages(["a"]),
        lambda: grid.send_and_receive(["a"], timeout=5),  # type: ignore[list-item]
    ):
        with pytest.raises(KeyboardInterrupt):
            call()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.mark.integration  # a real subprocess or model: seconds, kept out of the unit run
@pytest.mark.parametrize("cut_short", [False, True], ids=["grace-passed", "second-ctrl-c"])
def test_an_abandoned_round_loop_leaves_its_mlflow_run_killed(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_short: bool
) -> None:
    # A round that ignores the stop past the grace period (a hung evaluation or store)
    # cannot be made on purpose with real sites, so a thread that waits until released
    # stands in for the round loop. The MLflow runs are real; a run its loop had ended
    # already (it was publishing) keeps its status.
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(simulation, "STOP_GRACE_SECONDS", 30.0 if cut_short else 0.2)
    running, ended = (
        Tracker(tracking_uri, "abandoned", artifact_root=tmp_path / "artifacts") for _ in range(2)
    )
    running.start(params={})
    ended.start(params={})
    ended.finish()
    release = threading.Event()
    stuck = threading.Thread(target=release.wait, daemon=True)
    stuck.start()
    try:
        if cut_short:  # Ctrl-C again, 0.3 s into the 30 s wait
            main = threading.main_thread().ident
            assert main is not None
            # Ctrl-C's default here, though a test session in the background ignores it.
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            again = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
            try:
                again.start()
                with pytest.raises(KeyboardInterrupt):
                    _wait_for_training([stuck], again="Ctrl-C", trackers=[running, ended])
            finally:
                again.cancel()
                signal.signal(signal.SIGINT, previous)
        else:
            _wait_for_training([stuck], again="Ctrl-C", trackers=[running, ended])
            assert stuck.is_alive()  # abandoned, not waited for
    finally:
        release.set()

    client = MlflowClient(tracking_uri=tracking_uri)
    assert client.get_run(str(running.run_id)).info.status == "KILLED"
    assert client.get_run(str(ended.run_id)).info.status == "FINISHED"


@pytest.mark.integration  # waits out a real grace period or signal: seconds
def test_the_mlflow_run_is_killed_as_soon_as_the_stop_begins(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `docker stop` sends SIGKILL 10 s after SIGTERM, before a round that does not stop
    # has had its grace period: the run must not be left RUNNING. A thread stands in for
    # the round loop (a real one stops too soon to be watched): it waits for its MLflow
    # run to be marked while the wait for it is still on, then ends its last round and
    # finishes the run, which then stands as FINISHED.
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(simulation, "STOP_GRACE_SECONDS", 30.0)
    client = MlflowClient(tracking_uri=tracking_uri)
    tracker = Tracker(tracking_uri, "stopping", artifact_root=tmp_path / "artifacts")
    tracker.start(params={})
    seen: list[str] = []

    def round_loop() -> None:
        deadline = time.monotonic() + 10
        while (status := client.get_run(str(tracker.run_id)).info.status) != "KILLED":
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        seen.append(status)
        tracker.finish()

    loop = threading.Thread(target=round_loop, daemon=True)
    loop.start()

    _wait_for_training([loop], again="SIGTERM", trackers=[tracker])

    assert seen == ["KILLED"]  # marked before the wait, which the loop then ended
    assert client.get_run(str(tracker.run_id)).info.status == "FINISHED"


@pytest.mark.integration  # a real MLflow store: seconds, kept out of the unit run
@pytest.mark.parametrize("resumed", [False, True], ids=["new-run", "resumed-run"])
def test_a_stop_before_the_run_opens_marks_it_killed_as_it_opens(
    tracking_uri: str, tmp_path: Path, resumed: bool
) -> None:
    # The stop begins while the round loop is still before `start` (loading the model,
    # or inside a slow create_run): the run it then opens must not stay RUNNING.
    from mlflow.tracking import MlflowClient

    earlier = None
    if resumed:  # a run stopped before, which --resume reopens
        first = Tracker(tracking_uri, "opening", artifact_root=tmp_path / "artifacts")
        earlier = first.start(params={})
        first.finish("KILLED")
    tracker = Tracker(tracking_uri, "opening", artifact_root=tmp_path / "artifacts")

    tracker.kill_unless_ended()  # the stop: nothing to mark yet
    run_id = tracker.start(params={"a": "1"}, run_id=earlier)

    assert run_id == (earlier or run_id) and tracker.status == "KILLED"
    assert MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.status == "KILLED"


@pytest.mark.integration  # a real MLflow store: seconds, kept out of the unit run
def test_a_stop_while_the_loop_ends_its_run_in_a_slow_store_does_not_wait_for_it(
    tracking_uri: str, tmp_path: Path
) -> None:
    # A remote store that takes its time to answer cannot be made on purpose with a
    # local one, so the loop's own set_terminated call is held until released; the
    # store underneath is real. The loop is ending its run: the stop's KILLED mark gives
    # way after KILL_WAIT_SECONDS and is never sent.
    from mlflow.tracking import MlflowClient

    from server.tracking import KILL_WAIT_SECONDS

    tracker = Tracker(tracking_uri, "slow", artifact_root=tmp_path / "artifacts")
    tracker.start(params={})
    real, release, inside = tracker.client.set_terminated, threading.Event(), threading.Event()
    sent: list[str] = []

    def slow(run_id: str, status: str) -> None:
        sent.append(status)
        inside.set()
        release.wait(30)
        real(run_id, status=status)

    tracker.client.set_terminated = slow  # type: ignore[method-assign]
    loop = threading.Thread(target=tracker.finish, daemon=True)
    loop.start()
    assert inside.wait(10)
    try:
        started = time.monotonic()
        tracker.kill_unless_ended()
        took = time.monotonic() - started
    finally:
        release.set()
    loop.join(10)

    assert KILL_WAIT_SECONDS <= took < KILL_WAIT_SECONDS + 2
    assert sent == ["FINISHED"] and tracker.status == "FINISHED"
    client = MlflowClient(tracking_uri=tracking_uri)
    assert client.get_run(str(tracker.run_id)).info.status == "FINISHED"


def test_the_exit_now_hint_is_shown_before_the_mlflow_run_is_marked() -> None:
    # The mark is a call to the tracking store, which may be slow: the user learns first
    # that a second Ctrl-C exits at once. A recording tracker is the unit seam here.
    events: list[str] = []

    class Recording:
        run_id = "r"

        def kill_unless_ended(self) -> None:
            events.append("marked")

    class Logged(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append(record.getMessage())

    handler = Logged(level=logging.WARNING)
    simulation.log.addHandler(handler)
    stuck = threading.Thread(target=time.sleep, args=(0.1,), daemon=True)
    stuck.start()
    try:
        _wait_for_training([stuck], again="Ctrl-C", trackers=[Recording()])  # type: ignore[list-item]
    finally:
        simulation.log.removeHandler(handler)

    assert events[0].startswith("stopping: the round in flight has up to")
    assert "(Ctrl-C again: exit now)" in events[0]
    assert events[1] == "marked"


class _FakeStore:
    """The MLflow client calls `Tracker` makes, recorded; ``slow`` names calls that wait
    ``delay`` s and ``fail`` one that raises. A store that answers slowly or fails midway
    through opening a run cannot be made on purpose with a real one."""

    def __init__(self, *, slow: tuple[str, ...] = (), delay: float = 0.0, fail: str = "") -> None:
        self.calls: list[tuple[str, str]] = []  # as the store applied them
        self.started: list[tuple[str, str]] = []  # as they were made
        self.inside = threading.Event()  # set once a slow call has begun
        self.slow, self.delay, self.fail = slow, delay, fail

    def _call(self, name: str, detail: str = "") -> None:
        self.started.append((name, detail))
        if name in self.slow:
            self.inside.set()
            time.sleep(self.delay)
        if name == self.fail:
            raise OSError(f"{name} failed")
        self.calls.append((name, detail))  # as the store applies it: the last one stands

    def create_run(self, experiment_id: str, **_: object) -> SimpleNamespace:
        self._call("create_run")
        return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

    def update_run(self, run_id: str, status: str) -> None:
        self._call("update_run", status)

    def log_batch(self, run_id: str, **_: object) -> None:
        self._call("log_batch")

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._call("log_text")

    def set_terminated(self, run_id: str, status: str) -> None:
        self._call("set_terminated", status)


def _fake_tracker(store: _FakeStore) -> Tracker:
    tracker = Tracker.__new__(Tracker)  # no store to reach: the fake stands in for it
    tracker.client, tracker.experiment_id = store, "0"
    tracker.run_id, tracker.status = None, None
    tracker._ending, tracker._kill_requested = threading.Lock(), False
    tracker._site_keys = set()
    return tracker


@pytest.mark.parametrize("resumed", [False, True], ids=["new-run", "resumed-run"])
def test_a_stop_that_gives_way_to_a_slow_start_is_applied_as_the_run_opens(
    monkeypatch: pytest.MonkeyPatch, resumed: bool
) -> None:
    # The stop comes while `start` is inside the store's slow call that opens the run
    # (create_run, or update_run to RUNNING on a resume). It must give way after
    # KILL_WAIT_SECONDS, not wait for the store nor mark at once: a KILLED mark the store
    # applied before the reopening RUNNING would be undone by it.
    from server import tracking

    monkeypatch.setattr(tracking, "KILL_WAIT_SECONDS", 0.2)  # the unit run stays short
    store = _FakeStore(slow=("update_run" if resumed else "create_run",), delay=0.8)
    tracker = _fake_tracker(store)
    opening = threading.Thread(
        target=tracker.start,
        kwargs={"params": {}, "run_id": "r1" if resumed else None},
    )
    opening.start()
    assert store.inside.wait(10)  # inside the slow call, holding the lock

    started = time.monotonic()
    tracker.kill_unless_ended()
    took = time.monotonic() - started
    opening.join(10)

    assert 0.2 <= took < 0.7  # gave way; did not wait the store's 0.8 s out
    opened = ("update_run", "RUNNING") if resumed else ("create_run", "")
    assert store.calls[0] == opened
    assert store.calls[-1] == ("set_terminated", "KILLED") and tracker.status == "KILLED"
    assert [c for c in store.calls if c[0] == "set_terminated"] == [("set_terminated", "KILLED")]


def test_a_start_that_fails_after_the_run_exists_still_marks_a_stopped_run_killed() -> None:
    store = _FakeStore(fail="log_text")
    tracker = _fake_tracker(store)
    tracker.kill_unless_ended()  # the stop came first: nothing open yet

    with pytest.raises(OSError, match="log_text failed"):  # start's own error propagates
        tracker.start(params={}, config_toml="x")

    assert tracker.status == "KILLED" and store.calls[-1] == ("set_terminated", "KILLED")


def test_a_stopped_resume_is_not_set_running_again() -> None:
    store = _FakeStore()
    tracker = _fake_tracker(store)
    tracker.kill_unless_ended()

    assert tracker.start(params={}, run_id="earlier") == "earlier"

    assert store.calls == [("set_terminated", "KILLED")]


def test_a_second_signal_during_a_slow_kill_mark_exits_without_another_store_call() -> None:
    # The first mark waits on a store that takes 3 s; Ctrl-C again 0.3 s in must end the
    # wait at once, not make the same slow call a second time.
    store = _FakeStore(slow=("set_terminated",), delay=3.0)
    tracker = _fake_tracker(store)
    tracker.start(params={})
    stuck = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    stuck.start()
    main = threading.main_thread().ident
    assert main is not None
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    again = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    started = time.monotonic()
    try:
        again.start()
        with pytest.raises(KeyboardInterrupt):
            _wait_for_training([stuck], again="Ctrl-C", trackers=[tracker])
    finally:
        again.cancel()
        signal.signal(signal.SIGINT, previous)

    assert time.monotonic() - started < 2.5
    assert [c for c in store.started if c[0] == "set_terminated"] == [("set_terminated", "KILLED")]
