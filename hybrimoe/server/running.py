"""The requests in the engine's batch, by the batch's request id: each chunk goes to its own job, and
every way a request leaves (finished, cancelled, failed) is accounted once in the metrics.

Changed on the engine thread only; `jobs()` / `ids()` are snapshots other threads may take (close,
shutdown abort).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from hybrimoe.engine.types import StreamChunk
from hybrimoe.server.events import Failed, Finished, Job, Started
from hybrimoe.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class Request:
    job: Job
    prompt_tokens: int
    max_new_tokens: int
    joined_at: float = field(default_factory=time.perf_counter)
    generated: int = 0  # tokens delivered so far
    first_token_seconds: float | None = None  # from arrival at the server to the first token


class Running:
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._requests: dict[int, Request] = {}

    @property
    def count(self) -> int:
        return len(self._requests)

    def jobs(self) -> list[Job]:
        with self._lock:
            return [r.job for r in self._requests.values()]

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._requests)

    def cancelled_ids(self) -> list[int]:
        with self._lock:
            return [i for i, r in self._requests.items() if r.job.cancelled]

    def add(self, request_id: int, job: Job, prompt_tokens: int, max_new_tokens: int) -> None:
        """`job` joined the batch as `request_id` (its wait for the engine ends here)."""
        request = Request(job, prompt_tokens, max_new_tokens)
        with self._lock:
            assert request_id not in self._requests, f"request id {request_id} is already running"
            self._requests[request_id] = request
        self.metrics.started(request.joined_at - job.created_at)

    def deliver(self, request_id: int, chunk: StreamChunk) -> float | None:
        """Push `chunk` to its job (Started before the first one, Finished after the last one). Returns
        the request's seconds in the batch when this chunk ended it, else None. Chunks of a request that
        already left are dropped."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        job = request.job
        if request.first_token_seconds is None:  # prefill and the first token are done: accepted
            request.first_token_seconds = time.perf_counter() - job.created_at
            self.metrics.first_token(request.first_token_seconds)
            job.push(Started(prompt_tokens=request.prompt_tokens, max_new_tokens=request.max_new_tokens))
        request.generated += len(chunk.token_ids)
        if chunk.result is None:
            job.push(chunk)
            return None
        self._remove(request_id)
        self.metrics.ended(request.prompt_tokens, request.generated, chunk.result)  # before the client sees the end
        log.debug("request %d: %d tokens, first after %.3f s", request_id, request.generated,
                  request.first_token_seconds)
        job.push(chunk)
        job.push(Finished())
        return time.perf_counter() - request.joined_at

    def cancelled(self, request_id: int) -> None:
        """The request left the batch because its job was cancelled (client gone, close, abort)."""
        request = self._remove(request_id)
        if request is None:
            return
        log.info("request cancelled after %d tokens", request.generated)
        self.metrics.cancelled()
        self.metrics.ended(request.prompt_tokens, request.generated, None)

    def fail(self, request_id: int, error: BaseException) -> None:
        """The request failed (and has left the batch): its client gets `error`."""
        request = self._remove(request_id)
        if request is None:
            return
        if not request.job.cancelled:
            request.job.push(Failed(error))
        request.job.cancel()
        self.metrics.ended(request.prompt_tokens, request.generated, None)

    def fail_all(self, error: BaseException) -> list[int]:
        """Fail every running request; returns their ids."""
        ids = self.ids()
        for request_id in ids:
            self.fail(request_id, error)
        return ids

    def _remove(self, request_id: int) -> Request | None:
        with self._lock:
            return self._requests.pop(request_id, None)
