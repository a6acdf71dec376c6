"""The micro-batcher and the refresher: bounded, batched, coalesced, never stuck.

The batch function here is a plain Python function: the batcher's contract does not
depend on what a batch computes (the model's side is tested in test_runtime.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from clients.edge.batching import Batcher, Job, QueueFull
from clients.edge.refresher import Refresher


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[object]] = []

    def __call__(self, jobs: Sequence[Job]) -> None:
        self.batches.append([job.payload for job in jobs])
        for job in jobs:
            job.future.set_result(job.payload)


def test_waiting_requests_share_one_batch_up_to_the_row_limit() -> None:
    run = Recorder()
    batcher = Batcher(run, max_rows=4, max_queue=100, max_wait_s=0.0, name="t")
    gate = threading.Event()
    batcher.call(gate.wait, wait=False)  # the worker is busy while requests arrive
    futures = [batcher.submit(i, rows=2 if i == 2 else 1) for i in range(6)]
    gate.set()

    assert [f.result(timeout=10) for f in futures] == list(range(6))
    assert run.batches == [[0, 1, 2], [3, 4, 5]]  # 1+1+2 rows, then 3 rows
    batcher.close()


def test_a_lone_request_does_not_wait_for_the_batch_budget() -> None:
    batcher = Batcher(Recorder(), max_rows=32, max_queue=10, max_wait_s=5.0, name="t")
    start = time.perf_counter()

    assert batcher.submit("only", rows=1).result(timeout=10) == "only"

    assert time.perf_counter() - start < 2.5  # far below the 5 s budget
    batcher.close()


def test_a_full_queue_refuses_with_a_retry_time_instead_of_growing() -> None:
    batcher = Batcher(Recorder(), max_rows=1, max_queue=3, max_wait_s=0.0, name="t")
    gate = threading.Event()
    batcher.call(gate.wait, wait=False)
    accepted = [batcher.submit(i, rows=1) for i in range(3)]

    with pytest.raises(QueueFull) as full:
        batcher.submit("one too many", rows=1)

    assert full.value.retry_after_s >= 1 and batcher.waiting == 3
    gate.set()
    assert [f.result(timeout=10) for f in accepted] == [0, 1, 2]
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on() -> None:
    calls = []

    def run(jobs: Sequence[Job]) -> None:
        calls.append(len(jobs))
        if jobs[0].payload == "bad":
            raise RuntimeError("boom")
        for job in jobs:
            job.future.set_result("ok")

    batcher = Batcher(run, max_rows=1, max_queue=10, max_wait_s=0.0, name="t")
    bad = batcher.submit("bad", rows=1)
    good = batcher.submit("good", rows=1)

    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == "ok"
    with pytest.raises(ValueError, match="control"):
        batcher.call(lambda: (_ for _ in ()).throw(ValueError("control")))
    batcher.close()


def test_a_storm_of_refresh_requests_is_one_running_and_one_pending_refresh() -> None:
    started = threading.Event()
    release = threading.Event()
    runs = []

    def slow_refresh() -> dict[str, bool]:
        runs.append(1)
        started.set()
        release.wait(10)
        return {"m": len(runs) == 1}

    refresher = Refresher(slow_refresh, poll_seconds=None)
    first = refresher.request()
    assert started.wait(10)
    with ThreadPoolExecutor(16) as pool:  # 200 requests while the first refresh runs
        storm = list(pool.map(lambda _: refresher.request(), range(200)))
    release.set()

    assert first.result(timeout=10) == {"m": True}
    assert all(f.result(timeout=10) == {"m": False} for f in storm)
    assert len(runs) == 2  # the running refresh and one that started after the storm
    refresher.stop()
