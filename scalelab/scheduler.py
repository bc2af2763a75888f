"""One engine, many requests: a worker thread owns the engine and decodes every request in one shared batch.

Decode requests join the engine's continuous `Batch` between steps and leave when done, so concurrent
requests (any n, streamed or not) share each forward. One-shot calls (scoring) run between steps. Each
request is a `Job` whose items (a decode step's deltas, or a call's result) reach the waiting coroutine
through its event loop. A cancelled job (its client went away) leaves the batch before the next forward: the
engine is free of it within one step.

One thread computes: the worker runs every forward of the server (decode steps, and scoring and P(Yes) calls
submitted with `submit`). OpenMP (torch's intra-op threads) keeps a team of threads per thread that ran a
parallel region; the thread that loaded the model holds one, and a second team (the worker's) means more
spinning threads than cores, which makes libgomp put its workers to sleep after every region: on 2 cores a
batched SmolLM2 decode on the worker ran 1.6x slower than the same decode on the loading thread (8 samples ×
48 tokens, 2.5 s vs 1.5 s). The scheduler therefore frees the creating thread's team (`release_openmp`) before
its worker starts; the team comes back by itself if that thread computes again.

Admission: at most `max_rows` sequences decode at once and their KV positions stay within `kv_tokens`;
requests that do not fit yet wait in arrival order, at most `max_waiting` of them (`Full` beyond that, which
the server answers with 429). A request that could never fit is refused at once (`TooLarge`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from scalelab.engine import Batch, Engine, SamplingParams
from scalelab.errors import ScalelabError

log = logging.getLogger("scalelab")
_END = object()


class Full(ScalelabError):
    """The waiting line is full: retry later."""


class TooLarge(ScalelabError):
    """The request needs more sequences or KV positions than this server has at all."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Job:
    """One request: its items arrive in `queue`, on the event loop of the coroutine that submitted it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, call: Callable[[], Any] | None = None,
                 prompt: Sequence[int] = (), params: SamplingParams | None = None, collector: Any = None):
        self.loop, self.call, self.prompt, self.params = loop, call, list(prompt), params
        self.collector = collector  # set: the worker gathers the deltas itself and wakes the loop once, at the end
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.cached_tokens = 0  # prompt tokens found in the prefix cache (set on the worker at prefill)
        self.req = None

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
        """A one-shot call's result."""
        last = None
        async for item in self.items():
            last = item
        return last


def release_openmp() -> bool:
    """Free the calling thread's OpenMP worker threads: libgomp's (GCC's runtime, which torch's Linux wheels
    ship) `omp_pause_resource_all(omp_pause_hard)` frees the calling thread's pool only, and a later parallel
    region on that thread starts a new one. False where libgomp is not loaded (other runtimes' hard pause shuts
    down every thread's pool, which is not safe while another thread computes; there nothing is done)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "/libgomp" in line})
    except OSError:
        return False
    for lib in libs:
        try:
            pause = ctypes.CDLL(lib).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(2) == 0  # omp_pause_hard
    return False


class Scheduler:
    """The worker thread. `lock` (optional) is held for each step and call, so other users of the same engine
    in this process interleave with the server safely."""

    def __init__(self, engine: Engine, lock: threading.Lock | None = None, max_rows: int = 64,
                 kv_tokens: int | None = None, max_waiting: int = 64):
        self.engine, self.lock = engine, lock or threading.Lock()
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.kv_tokens = kv_tokens if kv_tokens is not None else max_rows * engine.cfg.context
        self.batch = Batch(engine)
        self.calls: collections.deque[Job] = collections.deque()
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[Any, Job] = {}  # batch request -> its job
        self.cv = threading.Condition()
        self.closed = False
        self.steps = 0  # batch steps over the scheduler's life
        self.peak_rows = 0  # the most sequences decoded together in one step
        release_openmp()  # this thread's team (it loaded the model, typically): the worker's is the only one
        self.thread = threading.Thread(target=self._loop, name="scalelab-engine", daemon=True)
        self.thread.start()

    # ---- the coroutine side --------------------------------------------------------------------------------
    def submit_decode(self, prompt: Sequence[int], params: SamplingParams, bounded: bool = True,
                      collector: Any = None) -> Job:
        """Queue a decode request; its items are each step's deltas (lists of `engine.Delta`), or none at all
        when a `collector` (an `engine.Collector`) is given: the worker adds the deltas to it, so a request read
        whole wakes the event loop once, when it ends, not every step (every wake-up takes a core from the
        step's threads). `bounded=False` (a served search's own calls) waits however long the line is instead
        of raising `Full`."""
        if params.n > self.max_rows:
            raise TooLarge(f"n = {params.n} is more than this server decodes at once ({self.max_rows})")
        need = self.engine.kv_positions(len(prompt), params)
        if need > self.kv_tokens:
            raise TooLarge(f"the request needs {need} KV positions (n × (prompt + max_tokens)) but this server "
                           f"has {self.kv_tokens}")
        return self._enqueue(Job(asyncio.get_running_loop(), prompt=prompt, params=params, collector=collector),
                             self.waiting, bounded)

    def submit(self, call: Callable[[], Any]) -> Job:
        """Queue a one-shot call (run on the worker between steps); its one item is the call's result."""
        return self._enqueue(Job(asyncio.get_running_loop(), call=call), self.calls)

    def _beyond(self, extra: Job | None) -> int:
        """How many waiting requests (and `extra`, last) will not fit in the batch as it stands: the line."""
        rows, kv, over = self.batch.live_rows, self.batch.kv_tokens, 0
        for job in [*self.waiting, *([extra] if extra is not None else [])]:
            need = self.engine.kv_positions(len(job.prompt), job.params)
            if not over and rows + job.params.n <= self.max_rows and kv + need <= self.kv_tokens:
                rows, kv = rows + job.params.n, kv + need
            else:
                over += 1
        return over

    def _enqueue(self, job: Job, line: collections.deque, bounded: bool = True) -> Job:
        with self.cv:
            if self.closed:
                raise Full("the server is shutting down")
            if bounded and job.params is not None and self._beyond(job) > self.max_waiting:
                raise Full(f"the server is busy (the batch is full and {self.max_waiting} requests are waiting): "
                           "retry later")
            if job.params is None and len(self.calls) >= self.max_waiting:
                raise Full(f"the server is busy ({self.max_waiting} calls waiting): retry later")
            line.append(job)
            self.cv.notify()
        return job

    def pending(self) -> int:
        """Requests decoding, joining or waiting."""
        with self.cv:
            return len(self.batch) + len(self.waiting) + len(self.calls)

    def close(self) -> None:
        """Cancel every job and stop the worker after its current step."""
        with self.cv:
            self.closed = True
            for job in [*self.waiting, *self.calls, *self.jobs.values()]:
                job.cancel()
            self.cv.notify()

    # ---- the worker ----------------------------------------------------------------------------------------
    def _end(self, job: Job, item: Any = _END) -> None:
        if item is not _END:
            job._put(item)
        job._put(_END)

    def _admit(self) -> None:
        """Move waiting requests into the batch, in arrival order, while they fit."""
        b = self.batch
        while True:
            with self.cv:
                if not self.waiting:
                    return
                job = self.waiting[0]
                need = self.engine.kv_positions(len(job.prompt), job.params)
                if not job.cancelled.is_set() and not b.fits(job.params.n, need, self.max_rows, self.kv_tokens):
                    return
                self.waiting.popleft()
            if job.cancelled.is_set():
                self._end(job)
                continue
            try:
                with self.lock:
                    job.req = b.add(job.prompt, job.params)
                job.cached_tokens = job.req.cached
                self.jobs[job.req] = job
            except Exception as e:  # noqa: BLE001 - handed to the request that caused it
                self._end(job, _Failure(e))

    def _loop(self) -> None:
        b = self.batch
        while True:
            with self.cv:
                while not self.closed and not self.calls and not self.waiting and not len(b):
                    self.cv.wait()
                if self.closed:
                    break
                calls = list(self.calls)
                self.calls.clear()
            for job in calls:
                if job.cancelled.is_set():
                    self._end(job)
                    continue
                try:
                    with self.lock:
                        result = job.call()
                    self._end(job, result)
                except Exception as e:  # noqa: BLE001
                    self._end(job, _Failure(e))
            for req, job in list(self.jobs.items()):
                if job.cancelled.is_set():
                    b.remove(req)
                    del self.jobs[req]
                    self._end(job)
            self._admit()
            if not len(b):
                continue
            try:
                with self.lock:
                    out = b.step()
            except Exception as e:  # noqa: BLE001 - a bug in a step: fail every request in it, keep serving
                log.exception("a batch step failed")
                for req, job in list(self.jobs.items()):
                    b.remove(req)
                    self._end(job, _Failure(e))
                self.jobs.clear()
                continue
            self.steps += 1
            self.peak_rows = max(self.peak_rows, sum(len(d) for d in out.values()))
            for req, deltas in out.items():
                job = self.jobs.get(req)
                if job is None:
                    continue
                if job.collector is not None:
                    job.collector.add(deltas)
                else:
                    job._put(deltas)
                if req.done:
                    del self.jobs[req]
                    self._end(job)
        for job in [*self.waiting, *self.calls, *self.jobs.values()]:
            self._end(job)
