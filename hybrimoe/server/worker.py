"""One thread owns the Engine and serves requests from a queue, one sequence at a time.

The Engine is single-sequence and not thread-safe (docs/CONTRACTS.md), and so is its tokenizer, so
every call into it (tokenising the prompt, generating, reading `stats()`) happens on this thread.
The event loop submits a `Job` and awaits its events on an `asyncio.Queue`; the worker pushes them
with `loop.call_soon_threadsafe`. A job whose `cancel()` was called (client gone) is skipped while
queued, or stopped between two tokens while running.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hybrimoe.engine.types import GenerationResult, SamplingParams, StreamChunk
from hybrimoe.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

# Runs on the worker thread: tokenises and validates the request, returns (prompt ids, params).
# Raising (APIError, HybrimoeError, ...) rejects the request before any token is generated.
BuildFn = Callable[[Any], tuple[list[int], SamplingParams]]

STATS_REFRESH_SECONDS = 0.5  # how often a running job refreshes the engine stats snapshot


@dataclass
class Started:
    """First event of an accepted job: the prompt was tokenised and fits."""

    prompt_tokens: int
    max_new_tokens: int


@dataclass
class Failed:
    """The job failed: `error` is what the build step or the engine raised."""

    error: BaseException


@dataclass
class Finished:
    """Last event of every job that was not cancelled."""


Event = Started | StreamChunk | Failed | Finished


@dataclass
class Job:
    """One request's place in the queue and its private channel of events back to the event loop."""

    build: BuildFn
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Give up this job: skipped if still queued, stopped after the current token if running."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: Event) -> None:
        """Deliver an event to the awaiting coroutine (callable from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()

    async def next_event(self) -> Event:
        return await self.events.get()


class EngineWorker:
    """Owns `engine` on a daemon thread; `submit` queues jobs, `close` stops the thread."""

    def __init__(self, engine: Any, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hybrimoe-engine", daemon=True)
        self._current: Job | None = None
        self._closing = threading.Event()
        self._stats: dict[str, float] = {}
        self._stats_lock = threading.Lock()
        self._last_stats_refresh = 0.0

    def start(self) -> None:
        self._refresh_stats(force=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, build: BuildFn, loop: asyncio.AbstractEventLoop) -> Job:
        if not self.alive or self._closing.is_set():
            raise RuntimeError("the engine worker is not running")
        job = Job(build=build, loop=loop)
        self.metrics.queued(+1)
        self._queue.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the running job, drop the queued ones, and join the thread."""
        self._closing.set()  # before reading _current: a job the thread takes now sees the flag (_run)
        current = self._current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self.metrics.queued(-1)
        self._queue.put(None)
        if self.alive:
            self._thread.join(timeout)
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
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.metrics.queued(-1)
            self._current = job  # before checking _closing: close() reads them in the other order
            if self._closing.is_set():
                job.cancel()
            if job.cancelled:
                self._current = None
                self.metrics.cancelled()
                continue
            try:
                self._serve(job)
            except Exception:  # never let one request kill the worker
                log.exception("unexpected error while serving a request")
            finally:
                self._current = None
                self._refresh_stats(force=True)

    def _serve(self, job: Job) -> None:
        # Building the request and the first chunk (prompt checks, prefill, first token) decide
        # whether it is accepted: an error before then is a rejection, reported before any output.
        first: StreamChunk | None = None
        try:
            prompt_ids, params = job.build(self.engine)
            stream = iter(self.engine.stream(prompt_ids, params))
            first = next(stream, None)
        except Exception as exc:
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
            log.exception("generation failed")
            job.push(Failed(exc))
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            end(None)
        job.push(Finished())
