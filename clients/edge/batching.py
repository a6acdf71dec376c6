"""Dynamic micro-batching behind a bounded queue, one worker thread per model.

Requests wait in a queue of at most ``max_queue`` jobs; a full queue refuses at once
(`QueueFull`, which the HTTP layer answers with 503 and ``Retry-After``) instead of
growing memory. One worker thread takes jobs in arrival order and hands them to
``run_batch`` in groups of at most ``max_rows`` rows (a job counts its texts or prompts).
A lone request runs at once; only when other requests are already waiting, or the last
batch held several, does the worker wait up to ``max_wait_s`` for more, so batching
costs a single client nothing (the policy of Triton's dynamic batcher with a small
queue delay, and of vLLM/TGI's waiting-served ratio).

Everything that touches the model runs on the worker: batches, and `Batcher.call`
control work (adding an adapter to the model) between batches. PEFT's per-request
adapter routing sets per-call state on the model, so one thread per model is also what
makes mixed-adapter batches safe without a lock.

    batcher = Batcher(run_batch, max_rows=32, max_queue=256, max_wait_s=0.002, name="m")
    future = batcher.submit(payload, rows=2)   # concurrent.futures.Future
    batcher.call(lambda: model.add_adapter("a7", config))
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from clients.task.errors import FedloraError

log = logging.getLogger(__name__)


class QueueFull(FedloraError):
    """The node has as many requests waiting as it may hold; the caller should retry."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"{waiting} requests are waiting; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Job:
    """One request's work: its payload, its row count, and the future it answers."""

    payload: Any
    rows: int
    future: Future[Any] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


RunBatch = Callable[[Sequence[Job]], None]  # must settle every job's future


class Batcher:
    """A bounded queue of jobs and the one thread that runs them in batches."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_rows: int,
        max_queue: int,
        max_wait_s: float,
        name: str,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_rows < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_rows={max_rows}, max_queue={max_queue}, max_wait_s={max_wait_s}")
        self._run_batch = run_batch
        self._on_batch = on_batch  # called with each batch's row count (metrics)
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._jobs: deque[Job] = deque()
        self._control: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._last_batch_jobs = 0
        self._seconds_per_job = 0.05  # running estimate behind Retry-After
        self._thread = threading.Thread(
            target=self._loop, name=f"fedlora-batch-{name}", daemon=True
        )
        self._thread.start()

    # producers -------------------------------------------------------------------

    def submit(self, payload: Any, *, rows: int) -> Future[Any]:
        """Queue one job; raise `QueueFull` when ``max_queue`` jobs are already waiting."""
        job = Job(payload, max(1, rows))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(len(self._jobs), self.retry_after_s())
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def call(self, fn: Callable[[], Any], *, wait: bool = True) -> Any:
        """Run ``fn`` on the worker between two batches; return its result (or raise).

        Not bounded by ``max_queue``: control work comes from the node itself, not clients.
        """
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._control.append((fn, future))
            self._cond.notify()
        return future.result() if wait else future

    def retry_after_s(self) -> float:
        """Seconds until the queue has room, from the recent time per job (at least 1)."""
        return max(1.0, round(len(self._jobs) * self._seconds_per_job))

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> bool:
        """Refuse new work, fail the queued jobs, end the worker; False if it still runs
        after 30 s (a batch in progress is never cut short)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._cond:
            queued = list(self._jobs)
            self._jobs.clear()
        for job in queued:  # outside the lock: their callbacks may call back in
            if job.future.set_running_or_notify_cancel():  # a cancelled one is settled
                job.future.set_exception(RuntimeError("the node is shutting down"))
        return not self._thread.is_alive()

    # the worker --------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        """Block for work; run control work first; return the next batch (None: closed)."""
        with self._cond:
            while True:
                while self._control:
                    fn, future = self._control.popleft()
                    self._cond.release()
                    try:
                        if future.set_running_or_notify_cancel():
                            future.set_result(fn())
                    except BaseException as exc:  # handed to the caller, never lost
                        future.set_exception(exc)
                    finally:
                        self._cond.acquire()
                if self._closed:
                    return None
                if self._jobs:
                    break
                self._cond.wait()
            busy = len(self._jobs) > 1 or self._last_batch_jobs > 1
            batch = [self._jobs.popleft()]
            rows = batch[0].rows
            deadline = time.perf_counter() + (self.max_wait_s if busy else 0.0)
            while rows < self.max_rows:
                if self._jobs:
                    if rows + self._jobs[0].rows > self.max_rows:
                        break
                    job = self._jobs.popleft()
                    batch.append(job)
                    rows += job.rows
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._control or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            started = time.perf_counter()
            if self._on_batch is not None:
                self._on_batch(sum(job.rows for job in batch))
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            try:
                if live:
                    self._run_batch(live)
            except BaseException as exc:  # a failed batch fails its requests, not the worker
                log.exception("batch of %d jobs failed", len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the batch left this request unanswered"))
            self._last_batch_jobs = len(batch)
            per_job = (time.perf_counter() - started) / len(batch)
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * per_job
