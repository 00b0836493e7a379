"""What travels between the event loop and the engine worker: a queued `Job`, its place in the queue
(`Ticket`), the events it yields (Started, StreamChunk..., Finished | Failed), and the two reasons a job
is not taken (QueueFull -> 429, Unavailable -> 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hybrimoe.engine.types import SamplingParams, StreamChunk

# Runs on the worker thread with the engine: returns (prompt ids, params). The server tokenises before
# queueing, so its build step only hands them over; raising rejects the request before any token.
BuildFn = Callable[[Any], tuple[list[int], SamplingParams]]


class Unavailable(RuntimeError):
    """The worker takes no more jobs: closed, shutting down, or dead (HTTP 503)."""


class QueueFull(Exception):
    """`max_queue` requests already wait (HTTP 429)."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy: {waiting} requests are already waiting for the engine; "
                         f"retry in {retry_after} s")
        self.waiting = waiting
        self.retry_after = retry_after


@dataclass
class Ticket:
    """A place among the waiting requests; released once (when its job leaves the queue, or is not sent)."""

    release_place: Callable[[], None]  # the worker's bookkeeping
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.release_place()


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
    ticket: Ticket | None = None
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
