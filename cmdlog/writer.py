"""The writer: one thread that owns every write transaction (group commit).

Async callers queue jobs and await futures. The thread takes the first
waiting job, drains every other job already queued (up to
`batch_commands_max` commands), runs them all in one LMDB write transaction
and commits once with a sync, so a thousand concurrent writers cost one
disk flush instead of a thousand. Client submissions that follow each other
in the queue go to the engine as one list, so the per-call setup (digests,
last sequence number, state overlay) is paid once per group, not once per
request. A caller's future resolves only after the commit that contains its
command has synced. If the commit fails, every job in it fails with the
same error and nothing of theirs is stored.

Jobs reach the thread once per event loop iteration, as one list: the jobs
that the iteration's requests queued. A hand-over per job cost each request
a wake-up of the thread, and the thread a GIL hand-off, while the loop was
still reading the other requests of its group.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from cmdlog.config import WriterConfig
from cmdlog.database import Database
from cmdlog.engine import Accepted, Submission
from cmdlog.errors import KeyReused, Overloaded, ShuttingDown
from cmdlog.store import Txn

log = structlog.get_logger(__name__)

RELEASE_INTERVAL_S = 1.0
"""How often the writer looks for held commands that can now be folded."""


@dataclass(slots=True)
class _Job:
    work: Callable[[Txn], Any] | None
    """The function to run in the transaction, or None for a job of `submissions`."""
    size: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    submissions: list[Submission] | None = None
    result: Any = None
    error: BaseException | None = None
    queued_at: float = field(default_factory=time.monotonic)


_STOP = object()


class Writer:
    """Runs engine work for async callers on one thread, grouping commits."""

    def __init__(self, database: Database, config: WriterConfig | None = None) -> None:
        self.database = database
        self.config = config or WriterConfig()
        # SimpleQueue is several times cheaper than Queue. It has no bound, so
        # _enqueue bounds the number of jobs waiting instead.
        self._queue: queue.SimpleQueue[list[_Job] | object] = queue.SimpleQueue()
        self._gathered: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        """Jobs queued in the current iteration of each loop, not handed over yet."""
        self._waiting = 0
        """Jobs whose callers still wait for a result. Only the event loop uses it."""
        self._thread = threading.Thread(target=self._run, name="cmdlog-writer")
        self._stopping = False
        self._carried: list[_Job] = []
        """Jobs taken from the queue that did not fit in the last group."""
        self.commits = 0
        self.commands_committed = 0
        self.on_commit: list[Callable[[], None]] = []
        """Callbacks run on the writer thread after each commit (keep them short)."""

    def start(self) -> None:
        self._thread.start()

    def queued(self) -> int:
        """Return the number of jobs queued or being committed."""
        return self._waiting

    async def run(self, work: Callable[[Txn], Any], *, size: int = 1) -> Any:
        """Run `work(txn)` in the next group commit and return its result.

        Raises `Overloaded` when the queue is full, `ShuttingDown` after
        `stop`, and whatever the commit raised.
        """
        return await self._enqueue(work, size, None)

    async def submit(self, submissions: list[Submission]) -> list[Accepted | KeyReused]:
        """Run `Engine.submit` on `submissions` in the next group commit."""
        results: list[Accepted | KeyReused] = await self._enqueue(
            None, len(submissions), submissions
        )
        return results

    async def _enqueue(
        self,
        work: Callable[[Txn], Any] | None,
        size: int,
        submissions: list[Submission] | None,
    ) -> Any:
        if self._stopping:
            raise ShuttingDown("the node is shutting down; retry on another node")
        if self._waiting >= self.config.queue_requests_max:
            raise Overloaded(
                f"the write queue is full ({self.config.queue_requests_max} "
                "requests); retry after a short wait"
            )
        loop = asyncio.get_running_loop()
        job = _Job(work, size, loop, loop.create_future(), submissions)
        gathered = self._gathered.get(loop)
        if gathered is None:
            gathered = self._gathered[loop] = []
            loop.call_soon(self._hand_over, loop)
        gathered.append(job)
        self._waiting += 1
        try:
            return await job.future
        finally:
            self._waiting -= 1

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """Pass the jobs that `loop` gathered in this iteration to the thread."""
        jobs = self._gathered.pop(loop, None)
        if jobs:
            self._queue.put(jobs)

    async def stop(self) -> None:
        """Commit every queued job, then end the thread."""
        self._stopping = True
        # Jobs gathered in this iteration go first, so they commit before the stop.
        for loop in list(self._gathered):
            self._hand_over(loop)
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _run(self) -> None:
        last_release = time.monotonic()
        while True:
            first: list[_Job] | object | None = self._carried
            self._carried = []
            if not first:
                try:
                    first = self._queue.get(timeout=RELEASE_INTERVAL_S)
                except queue.Empty:
                    first = None
            jobs, stop = self._drain(first)
            if jobs:
                self._commit(jobs)
            if time.monotonic() - last_release >= RELEASE_INTERVAL_S:
                last_release = time.monotonic()
                self._release_pending()
            if stop:
                return

    def _drain(self, first: list[_Job] | object | None) -> tuple[list[_Job], bool]:
        """Return the next group of jobs, from `first` on, and whether the stop
        came.

        A group ends once it contains `batch_commands_max` commands. The jobs of
        a list that did not fit wait in `_carried` for the next group.
        """
        if first is None:
            return [], False
        if first is _STOP:
            return [], True
        assert isinstance(first, list)
        jobs: list[_Job] = []
        size = 0
        listed = first
        while True:
            for index, job in enumerate(listed):
                if size >= self.config.batch_commands_max:
                    self._carried = listed[index:]
                    return jobs, False
                jobs.append(job)
                size += job.size
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if item is _STOP:
                return jobs, True
            assert isinstance(item, list)
            listed = item

    def _commit(self, jobs: list[_Job]) -> None:
        try:
            self.database.store.write(lambda txn: self._run_jobs(txn, jobs))
        except Exception as exc:  # every job in the failed commit gets the error
            for job in jobs:
                job.error = exc
            log.error("commit_failed", jobs=len(jobs), error=str(exc), exc_info=exc)
        else:
            self.commits += 1
            self.commands_committed += sum(job.size for job in jobs)
            for callback in self.on_commit:
                try:
                    callback()
                except Exception as exc:
                    log.error("commit_callback_failed", error=str(exc), exc_info=exc)
        finally:
            # One wake-up per event loop for the whole group, not one per job.
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
            for job in jobs:
                by_loop.setdefault(job.loop, []).append(job)
            for loop, group in by_loop.items():
                loop.call_soon_threadsafe(_resolve_all, group)

    def _run_jobs(self, txn: Txn, jobs: list[_Job]) -> None:
        """Run the jobs in queue order, each run of submissions in one call."""
        run: list[_Job] = []
        for job in jobs:
            if job.work is None:
                run.append(job)
                continue
            self._submit_run(txn, run)
            job.result = job.work(txn)
        self._submit_run(txn, run)

    def _submit_run(self, txn: Txn, run: list[_Job]) -> None:
        if not run:
            return
        items = [item for job in run for item in job.submissions or ()]
        results = self.database.engine.submit(txn, items)
        start = 0
        for job in run:
            job.result = results[start : start + job.size]
            start += job.size
        run.clear()

    def _release_pending(self) -> None:
        try:
            with self.database.store.read() as txn:
                held = txn.count("pending")
            if held:
                self.database.release_pending()
        except Exception as exc:
            log.error("pending_release_failed", error=str(exc), exc_info=exc)


def _resolve_all(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)
