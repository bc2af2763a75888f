"""One engine, many requests: a worker thread owns the engine and runs every request one step at a time.

A request is a `Job`: an iterator made on the worker thread (a decode stream, or a one-step call such as
scoring), one step per item (an item of None is a step with nothing to hand over yet), whose items are handed to the waiting coroutine through its event loop. The worker steps the live
jobs in turn (round robin, at most `max_active` at once, the rest wait in arrival order), so concurrent
clients all make progress and a cancelled job (its client went away) is closed before its next step: the
engine is free again within one decode step. Nothing here holds a lock across a yield.

This is the seam for continuous batching: the worker decides what runs in each step, the HTTP layer only
submits jobs and reads their items.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("scalelab")
_END = object()


class Job:
    """One request's iterator on the worker, and the queue its items arrive in (on the caller's event loop)."""

    def __init__(self, make: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop):
        self.make, self.loop = make, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.it: Iterator[Any] | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.cancel()

    async def items(self):
        """The job's items as they come; an exception raised on the worker is raised here."""
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    async def result(self) -> Any:
        """The job's last item (for one-shot jobs and collected generations)."""
        last = None
        async for item in self.items():
            last = item
        return last


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Scheduler:
    """The worker thread. `lock` (optional) is held for each step, so other users of the same engine in this
    process interleave with the server safely."""

    def __init__(self, lock: threading.Lock | None = None, max_active: int = 8):
        self.lock = lock or threading.Lock()
        self.max_active = max_active
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0  # steps run over the scheduler's life (tests and stats)
        self.thread = threading.Thread(target=self._loop, name="scalelab-engine", daemon=True)
        self.thread.start()

    def submit(self, make: Callable[[], Iterator[Any]]) -> Job:
        """Queue `make` (called on the worker) and return its job. Call from a coroutine."""
        job = Job(make, asyncio.get_running_loop())
        with self.cv:
            if self.closed:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(job)
            self.cv.notify()
        return job

    def pending(self) -> int:
        with self.cv:
            return len(self.waiting) + len(self.active)

    def close(self) -> None:
        """Cancel every job and stop the worker after its current step."""
        with self.cv:
            self.closed = True
            for job in [*self.waiting, *self.active]:
                job.cancel()
            self.cv.notify()

    def _next_batch(self) -> list[Job] | None:
        with self.cv:
            while not self.closed and not self.waiting and not self.active:
                self.cv.wait()
            if self.closed:
                return None
            while self.waiting and len(self.active) < self.max_active:
                self.active.append(self.waiting.popleft())
            return list(self.active)

    def _finish(self, job: Job, item: Any = _END) -> None:
        if job.it is not None and hasattr(job.it, "close"):
            try:
                job.it.close()  # runs the generator's cleanup now, on this thread
            except Exception:  # noqa: BLE001 - cleanup of a job that is being dropped
                log.exception("closing a job")
        if item is not _END:
            job._put(item)
        job._put(_END)
        with self.cv:
            if job in self.active:
                self.active.remove(job)

    def _loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            for job in jobs:
                if job.cancelled.is_set():
                    self._finish(job)
                    continue
                try:
                    with self.lock:
                        if job.it is None:
                            job.it = job.make()
                        item = next(job.it)
                    self.steps += 1
                except StopIteration:
                    self._finish(job)
                    continue
                except Exception as e:  # noqa: BLE001 - handed to the request that caused it
                    self._finish(job, _Failure(e))
                    continue
                if item is not None:  # None: a step that produced nothing to hand over yet
                    job._put(item)
        for job in [*self.waiting, *self.active]:
            self._finish(job)
