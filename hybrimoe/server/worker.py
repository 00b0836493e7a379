"""One thread owns the Engine and steps a batch of up to `max_batch` requests (`hybrimoe.server.batching`).

Each loop: requests whose client left (or that close/shutdown ended) are cancelled in the batch; queued
jobs join while fewer than `max_batch` run (their build step and the engine's checks run now: a
failure rejects that job only); one `step()` produces the next chunk of every running request, and each
chunk goes to its own job's event queue. With `max_batch` 1 this is the server before batching: one
request at a time through `Engine.stream`.

Admission: `admit()` reserves a place among the waiting requests (being tokenised or queued; the
running ones, up to `max_batch`, do not count) or raises QueueFull beyond `max_queue`; the place is
given back when the job joins the batch. `drain()` (shutdown) fails the queued jobs with 503 and
refuses new ones; `abort_running()` ends the running ones with an error. If the thread ever dies, every
waiting and running job is failed (503) and `alive` turns False (/health says 503).

The Engine is not thread-safe (docs/CONTRACTS.md), and neither is its tokenizer, so every call into it
(stepping, reading `stats()`) happens on this thread; prompts are tokenised before they are queued, on
copies of the tokenizer (`hybrimoe.server.encoding`). The event loop awaits a job's events on its own
`asyncio.Queue`; the worker pushes them with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from hybrimoe.errors import HybrimoeError
from hybrimoe.server.batching import DEFAULT_PREFILL_CHUNK, Stepper, make_stepper
from hybrimoe.server.events import (  # noqa: F401  (re-exported: the worker's public face)
    BuildFn,
    Failed,
    Finished,
    Job,
    QueueFull,
    Started,
    Ticket,
    Unavailable,
)
from hybrimoe.server.metrics import ServerMetrics
from hybrimoe.server.running import Running

log = logging.getLogger(__name__)

STATS_REFRESH_SECONDS = 0.5  # how often a running batch refreshes the engine stats snapshot
RETRY_AFTER_RANGE = (1, 60)  # seconds a 429 tells the client to wait: queue depth x mean service time / batch


class EngineWorker:
    """Owns `engine` on a daemon thread; `admit` + `submit` queue jobs, `close` stops the thread.

    max_queue: waiting requests beyond which `admit` raises QueueFull (None = unbounded);
    threads: torch threads of the engine thread (None = torch's default);
    max_batch: requests stepped together; prefill_chunk: prompt tokens per step of a BatchEngine;
    stepper: makes the batch (default `make_stepper(engine, max_batch, prefill_chunk)`,
    called now, so that a batch that does not fit in memory fails before the server starts).
    """

    def __init__(self, engine: Any, metrics: ServerMetrics, max_queue: int | None = None,
                 threads: int | None = None, max_batch: int = 1,
                 stepper: Callable[[], Stepper] | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.threads = threads
        self.max_batch = max_batch
        self.torch_threads: int | None = None  # as the engine thread reads it once started
        self._make_stepper = stepper or (lambda: make_stepper(engine, max_batch, prefill_chunk))
        self._stepper = self._make_stepper()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hybrimoe-engine", daemon=True)
        self._running = Running(metrics)  # request id -> job, of the requests in the batch
        self._closing = threading.Event()
        self._draining = threading.Event()
        self._place_lock = threading.Lock()
        self._waiting = 0
        self._service_seconds: float | None = None  # moving average of one job's time in the batch
        self._stats: dict[str, float] = {}
        self._stats_lock = threading.Lock()
        self._last_stats_refresh = 0.0
        metrics.max_batch = max_batch

    def start(self) -> None:
        self._refresh_stats(force=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self.alive and not self._closing.is_set() and not self._draining.is_set()

    def _check_accepting(self) -> None:
        if self._draining.is_set() and self.alive:
            raise Unavailable("the server is shutting down")
        if not self.accepting:
            raise Unavailable("the engine worker is not running")

    def admit(self) -> Ticket:
        """A place in the queue; Unavailable when not accepting, QueueFull beyond max_queue."""
        self._check_accepting()
        with self._place_lock:
            if self.max_queue is not None and self._waiting >= self.max_queue:
                waiting = self._waiting
                self.metrics.rejected("queue_full")
                raise QueueFull(waiting, self.retry_after(waiting))
            self._waiting += 1
        self.metrics.queued(+1)
        return Ticket(self._release_place)

    def _release_place(self) -> None:
        with self._place_lock:
            self._waiting -= 1
        self.metrics.queued(-1)

    def retry_after(self, waiting: int) -> int:
        """Seconds until a place is likely free: the waiting jobs times the mean service time, over the
        batch that serves them together."""
        mean = self._service_seconds or 1.0
        low, high = RETRY_AFTER_RANGE
        return int(min(high, max(low, math.ceil(waiting * mean / self.max_batch))))

    def submit(self, build: BuildFn, loop: asyncio.AbstractEventLoop, ticket: Ticket | None = None) -> Job:
        """Queue a job (admitting it first unless `ticket` holds its place); Unavailable / QueueFull."""
        ticket = ticket or self.admit()
        try:
            self._check_accepting()
        except Unavailable:
            ticket.release()
            raise
        job = Job(build=build, loop=loop, ticket=ticket)
        self._queue.put(job)
        return job

    def drain(self, error: BaseException) -> int:
        """Refuse new jobs and fail every queued one with `error`; the running ones go on. Returns how
        many queued jobs were failed."""
        self._draining.set()
        return self._fail_queued(error)

    def abort_running(self, error: BaseException) -> bool:
        """End every running job with `error` (its client sees it); each leaves the batch at the next
        step. Returns whether there was one."""
        aborted = False
        for job in self._running.jobs():
            if not job.cancelled:
                job.push(Failed(error))
                job.cancel()
                aborted = True
        return aborted

    def _fail_queued(self, error: BaseException | None) -> int:
        """Take every queued job out: failed with `error` (or just cancelled when None)."""
        failed = 0
        sentinel = False
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                sentinel = True
                continue
            if error is not None:
                job.push(Failed(error))
            job.cancel()
            if job.ticket is not None:
                job.ticket.release()
            failed += 1
        if sentinel:
            self._queue.put(None)
        return failed

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the running jobs, drop the queued ones, and join the thread."""
        self._closing.set()  # before reading the running jobs: a job the thread takes now sees the flag
        for job in self._running.jobs():
            job.cancel()
        self._fail_queued(None)
        self._queue.put(None)
        if self.alive:
            self._thread.join(timeout)
        self._fail_queued(Unavailable("the server is shutting down"))  # submitted while we closed
        close_engine = getattr(self.engine, "close", None)  # stops the hybrid runtime's CPU worker, frees slots
        if close_engine is not None and not self.alive:
            close_engine()

    def stats_snapshot(self) -> dict[str, float]:
        """The engine's `stats()` as last read on the worker thread."""
        with self._stats_lock:
            return dict(self._stats)

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_stats_refresh < STATS_REFRESH_SECONDS:
            return
        self._last_stats_refresh = now
        try:
            stats = dict(self.engine.stats())
        except Exception:  # a stats bug must not take the server down
            log.exception("engine.stats() failed")
            return
        with self._stats_lock:
            self._stats = stats

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads is not None:  # this thread's OpenMP team (and the default of threads made later)
            torch.set_num_threads(self.threads)
        self.torch_threads = torch.get_num_threads()
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 -- the thread is dying: nobody else would answer the clients
            log.critical("the engine worker died; the server answers 503 from now on", exc_info=True)
            self._running.fail_all(Unavailable("the engine worker died"))
            self._fail_queued(Unavailable("the engine worker died"))

    def _loop(self) -> None:
        while True:
            self._leave_cancelled()
            if not self._join_queued():
                for request_id in self._running.ids():  # close() cancelled them; free the engine's streams
                    self._stepper.cancel(request_id)
                    self._running.cancelled(request_id)
                return
            if self._running.count == 0:
                continue
            self.metrics.batch_step(self._running.count)
            try:
                events = self._stepper.step()
            except Exception as exc:  # not a request's failure (those are error events): every request fails
                self._report(exc)
                self._reset_stepper(self._running.fail_all(exc))
                continue
            finished = False
            for event in events:
                if event.error is not None:  # this request failed and left the batch; the others go on
                    self._report(event.error)
                    self._running.fail(event.request_id, event.error)
                    continue
                seconds = self._running.deliver(event.request_id, event.chunk)
                if seconds is not None:
                    finished = True
                    self._service_seconds = seconds if self._service_seconds is None else \
                        0.8 * self._service_seconds + 0.2 * seconds
            self._refresh_stats(force=finished)

    def _join_queued(self) -> bool:
        """Queued jobs join the batch while it has room; waits for one when nothing runs. False once
        close() asked the thread to stop."""
        while self._running.count < self.max_batch:
            idle = self._running.count == 0
            try:
                job = self._queue.get() if idle else self._queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._join(job)
        return True

    def _join(self, job: Job) -> None:
        if job.ticket is not None:
            job.ticket.release()
        if self._closing.is_set():
            job.cancel()
        if job.cancelled:
            self.metrics.cancelled()
            return
        try:
            prompt_ids, params = job.build(self.engine)
            request_id = self._stepper.submit(prompt_ids, params)
        except Exception as exc:  # this request's checks: it alone is refused, before any output
            if not isinstance(exc, HybrimoeError) and getattr(exc, "status", 500) >= 500:  # not the client's fault
                log.exception("a request failed before its first token")
            job.push(Failed(exc))
            return
        self._running.add(request_id, job, len(prompt_ids), params.max_new_tokens)
        if self._closing.is_set():  # close() may have read the running jobs before this one joined
            job.cancel()

    def _leave_cancelled(self) -> None:
        cancelled = self._running.cancelled_ids()
        for request_id in cancelled:
            self._stepper.cancel(request_id)
            self._running.cancelled(request_id)
        if cancelled and self._running.count == 0 and self._stepper.has_work():
            self._stepper.step()  # BatchEngine drops cancelled requests at a step: free them before idling

    def _reset_stepper(self, failed: list[int]) -> None:
        """After a step that raised: the failed requests leave the batch; if it cannot even cancel them,
        a fresh batch replaces it."""
        try:
            for request_id in failed:
                self._stepper.cancel(request_id)
            return
        except Exception:
            log.exception("cannot cancel the failed requests; making a fresh batch")
        self._stepper = None  # type: ignore[assignment]  (the old one's KV cache is freed first)
        self._stepper = self._make_stepper()

    @staticmethod
    def _report(exc: BaseException) -> None:
        if isinstance(exc, HybrimoeError):  # a clear message (e.g. NaN logits): no traceback needed
            log.error("generation failed: %s", exc)
        else:
            log.error("generation failed", exc_info=exc)
