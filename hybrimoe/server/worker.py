"""One thread owns the Engine and serves requests from a queue, one sequence at a time.

Admission: `admit()` reserves a place among the waiting requests (being tokenised or queued; the running
one does not count) or raises QueueFull beyond `max_queue`; the place is given back when the job leaves
the queue. `drain()` (shutdown) fails the queued jobs with 503 and refuses new ones; `abort_running()`
ends the running one with an error. If the thread ever dies, every waiting job is failed (503) and
`alive` turns False (/health says 503).

The Engine is single-sequence and not thread-safe (docs/CONTRACTS.md), and so is its tokenizer, so
every call into it (generating, reading `stats()`) happens on this thread; prompts are tokenised
before they are queued, on copies of the tokenizer (`hybrimoe.server.encoding`).
The event loop submits a `Job` and awaits its events on an `asyncio.Queue`; the worker pushes them
with `loop.call_soon_threadsafe`. A job whose `cancel()` was called (client gone) is skipped while
queued, or stopped between two tokens while running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from typing import Any

import torch

from hybrimoe.engine.types import GenerationResult, StreamChunk
from hybrimoe.errors import HybrimoeError
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

log = logging.getLogger(__name__)

STATS_REFRESH_SECONDS = 0.5  # how often a running job refreshes the engine stats snapshot
RETRY_AFTER_RANGE = (1, 60)  # seconds a 429 tells the client to wait: queue depth x mean service time


class EngineWorker:
    """Owns `engine` on a daemon thread; `admit` + `submit` queue jobs, `close` stops the thread.

    max_queue: waiting requests beyond which `admit` raises QueueFull (None = unbounded);
    threads: torch threads of the engine thread (None = torch's default).
    """

    def __init__(self, engine: Any, metrics: ServerMetrics, max_queue: int | None = None,
                 threads: int | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.threads = threads
        self.torch_threads: int | None = None  # as the engine thread reads it once started
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hybrimoe-engine", daemon=True)
        self._current: Job | None = None
        self._closing = threading.Event()
        self._draining = threading.Event()
        self._place_lock = threading.Lock()
        self._waiting = 0
        self._service_seconds: float | None = None  # moving average of one job's time on the engine
        self._stats: dict[str, float] = {}
        self._stats_lock = threading.Lock()
        self._last_stats_refresh = 0.0

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
        """Seconds until a place is likely free: the waiting jobs times the mean service time."""
        mean = self._service_seconds or 1.0
        low, high = RETRY_AFTER_RANGE
        return int(min(high, max(low, math.ceil(waiting * mean))))

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
        """Refuse new jobs and fail every queued one with `error`; the running job goes on. Returns how
        many queued jobs were failed."""
        self._draining.set()
        return self._fail_queued(error)

    def abort_running(self, error: BaseException) -> bool:
        """End the running job with `error` (its client sees it) and stop it after the current token."""
        job = self._current
        if job is None or job.cancelled:
            return False
        job.push(Failed(error))
        job.cancel()
        return True

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
        """Cancel the running job, drop the queued ones, and join the thread."""
        self._closing.set()  # before reading _current: a job the thread takes now sees the flag (_run)
        current = self._current
        if current is not None:
            current.cancel()
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

    def _run(self) -> None:
        if self.threads is not None:  # this thread's OpenMP team (and the default of threads made later)
            torch.set_num_threads(self.threads)
        self.torch_threads = torch.get_num_threads()
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 -- the thread is dying: nobody else would answer the waiting clients
            log.critical("the engine worker died; the server answers 503 from now on", exc_info=True)
            self._fail_queued(Unavailable("the engine worker died"))

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.ticket is not None:
                job.ticket.release()
            self._current = job  # before checking _closing: close() reads them in the other order
            if self._closing.is_set():
                job.cancel()
            if job.cancelled:
                self._current = None
                self.metrics.cancelled()
                continue
            start = time.perf_counter()
            try:
                self._serve(job)
            except Exception:  # never let one request kill the worker
                log.exception("unexpected error while serving a request")
            except BaseException:  # the thread dies (see _run): its client still gets an answer
                if not job.cancelled:
                    job.push(Failed(Unavailable("the engine worker died")))
                    job.cancel()
                raise
            finally:
                self._current = None
                self._refresh_stats(force=True)
            seconds = time.perf_counter() - start
            self._service_seconds = seconds if self._service_seconds is None else \
                0.8 * self._service_seconds + 0.2 * seconds

    def _serve(self, job: Job) -> None:
        # Building the request and the first chunk (prompt checks, prefill, first token) decide
        # whether it is accepted: an error before then is a rejection, reported before any output.
        first: StreamChunk | None = None
        try:
            prompt_ids, params = job.build(self.engine)
            stream = iter(self.engine.stream(prompt_ids, params))
            first = next(stream, None)
        except Exception as exc:
            if not isinstance(exc, HybrimoeError) and getattr(exc, "status", 500) >= 500:  # not the client's fault
                log.exception("generation failed before the first token")
            job.push(Failed(exc))
            return
        self.metrics.started(time.perf_counter() - job.created_at)
        job.push(Started(prompt_tokens=len(prompt_ids), max_new_tokens=params.max_new_tokens))
        generated = 0
        ended = False

        def end(result: GenerationResult | None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.metrics.ended(len(prompt_ids), generated, result)

        try:
            chunk = first
            while chunk is not None:
                if chunk is first:  # prefill and the first token are done
                    self.metrics.first_token(time.perf_counter() - job.created_at)
                generated += len(chunk.token_ids)
                if chunk.result is not None:  # account before the client can see the end
                    end(chunk.result)
                    self._refresh_stats(force=True)
                else:
                    self._refresh_stats()
                job.push(chunk)
                if chunk.result is not None:
                    break
                if job.cancelled:
                    log.info("request cancelled after %d tokens", generated)
                    self.metrics.cancelled()
                    return
                chunk = next(stream, None)
        except Exception as exc:
            if isinstance(exc, HybrimoeError):  # a clear message (e.g. NaN logits): no traceback needed
                log.error("generation failed: %s", exc)
            else:
                log.exception("generation failed")
            job.push(Failed(exc))
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            end(None)
        job.push(Finished())
