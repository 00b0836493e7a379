"""A stand-in batch for the server's batching tests: the Stepper interface over `Engine.stream`, every
running request advanced by one chunk per step (in join order), as a BatchEngine returns them. Each
request has its own stream (its own KV cache), so its tokens are its solo run's whatever joins or
leaves; a stream that raises ends its request with an error event. `steps` and `cancelled` record
what the worker asked for; `gate` (a Semaphore) makes each step wait for the test."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from hybrimoe.engine.types import SamplingParams, StreamChunk
from hybrimoe.engine.batch import BatchEvent

STEP_TIMEOUT = 10.0


class RoundRobinBatch:
    def __init__(self, engine: Any, max_batch: int, gate: threading.Semaphore | None = None) -> None:
        self.engine, self.max_batch, self.gate = engine, max_batch, gate
        self.running_streams: dict[int, Iterator[StreamChunk]] = {}
        self.queue: deque[tuple[int, Iterator[StreamChunk]]] = deque()
        self.steps: list[list[int]] = []  # request ids advanced by each step
        self.cancelled: list[int] = []  # request ids the worker cancelled
        self.submitted: list[int] = []
        self.asked = 0  # steps the worker asked for (gated: waiting for the test, or done)
        self._next_id = 100  # not 0: an id confused with a position shows

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        stream = iter(self.engine.stream(prompt_ids, params))
        request_id = self._next_id
        self._next_id += 7
        self.queue.append((request_id, stream))
        self.submitted.append(request_id)
        return request_id

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)
        stream = self.running_streams.pop(request_id, None)
        for entry in list(self.queue):
            if entry[0] == request_id:
                self.queue.remove(entry)
                stream = entry[1]
        if stream is not None:
            stream.close()

    def step(self) -> list[BatchEvent]:
        self.asked += 1
        if self.gate is not None and not self.gate.acquire(timeout=STEP_TIMEOUT):
            raise TimeoutError("the test never released the next step")
        while self.queue and len(self.running_streams) < self.max_batch:
            request_id, stream = self.queue.popleft()
            self.running_streams[request_id] = stream
        events = []
        for request_id, stream in list(self.running_streams.items()):
            try:
                chunk = next(stream)
            except Exception as exc:  # as BatchEngine: an error event, and the request leaves
                events.append(BatchEvent(request_id, StreamChunk(token_ids=[], text=""), error=exc))
                del self.running_streams[request_id]
                continue
            events.append(BatchEvent(request_id, chunk))
            if chunk.result is not None:
                del self.running_streams[request_id]
        self.steps.append([e.request_id for e in events])
        return events

    def has_work(self) -> bool:
        return bool(self.running_streams or self.queue)

    @property
    def running(self) -> int:
        return len(self.running_streams)

    @property
    def waiting(self) -> int:
        return len(self.queue)
