"""A queued job and its event stream, raced against the client's disconnect; what a failed job tells
the client (`rejection`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from hybrimoe.engine.sampling import NonFiniteLogitsError
from hybrimoe.engine.types import StreamChunk
from hybrimoe.errors import HybrimoeError
from hybrimoe.server.errors import APIError
from hybrimoe.server.worker import BuildFn, EngineWorker, Failed, Finished, Job, QueueFull, Started, Ticket, Unavailable


class ClientGone(Exception):
    """The client disconnected while its request was queued or running."""


def admission_error(error: QueueFull | Unavailable) -> APIError:
    """429 with Retry-After for a full queue; 503 for a worker that takes no jobs."""
    if isinstance(error, QueueFull):
        return APIError(429, f"{error} (serve --max-queue)", code="queue_full",
                        headers={"Retry-After": str(error.retry_after)})
    return APIError(503, str(error), type_="service_unavailable", code="service_unavailable")


def rejection(error: BaseException) -> APIError:
    """The API error for what a job's build step or the engine raised."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, (QueueFull, Unavailable)):
        return admission_error(error)
    if isinstance(error, NonFiniteLogitsError):  # the model's fault, not the request's
        return APIError(500, f"generation failed: {error}", type_="server_error")
    if isinstance(error, HybrimoeError):
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type_="server_error")


@dataclass
class RunningJob:
    """An accepted job and the task that notices its client leaving (and then cancels the job)."""

    job: Job
    started: Started
    watcher: asyncio.Task

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """The job's chunks until it finishes; raises ClientGone or the job's APIError."""
        while True:
            event = await _next_or_gone(self.job, self.watcher)
            if isinstance(event, Finished):
                return
            if isinstance(event, Failed):
                raise rejection(event.error)
            assert isinstance(event, StreamChunk), event
            yield event

    def close(self) -> None:
        """Release the engine (no-op if the job is over) and stop watching the client."""
        self.job.cancel()
        self.watcher.cancel()


async def start_job(worker: EngineWorker, build: BuildFn, request: Request, ticket: Ticket | None = None) -> RunningJob:
    """Queue the request (in the place `ticket` holds, else admitting it now) and wait until the engine
    accepts it (first token ready) or rejects it."""
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        job = worker.submit(build, asyncio.get_running_loop(), ticket)
    except (QueueFull, Unavailable) as exc:
        watcher.cancel()
        raise admission_error(exc) from None

    def client_left(task: asyncio.Task) -> None:
        # Frees the engine even if no response code runs again (a stream whose body iterator never
        # started, because the disconnect was noticed first, never reaches its `finally`).
        if not task.cancelled():
            job.cancel()

    watcher.add_done_callback(client_left)
    try:
        event = await _next_or_gone(job, watcher)
        if isinstance(event, Failed):
            raise rejection(event.error)
        if not isinstance(event, Started):
            raise APIError(500, f"unexpected first event {type(event).__name__}", type_="server_error")
    except BaseException:
        job.cancel()
        watcher.cancel()
        raise
    return RunningJob(job=job, started=event, watcher=watcher)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read before this starts)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_or_gone(job: Job, watcher: asyncio.Task) -> Any:
    if job.events.qsize():
        return job.events.get_nowait()
    getter = asyncio.ensure_future(job.next_event())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise ClientGone()
