"""What the engine thread steps: a batch of sequences behind one small interface (`Stepper`).

    --max-batch 1  SerialBatch: `Engine.stream` of one request at a time, as the server ran before
                   batching (same calls into the engine, same KV allocation per request)
    --max-batch N  hybrimoe.engine.batch.BatchEngine: up to N sequences decode together; a joining
                   request's prefill runs between decode steps

Both answer `submit` (the prompt and parameter checks of `Engine.stream`, raised before anything runs),
`cancel`, `step() -> [BatchEvent]` (each request's chunks, in order; its last one carries the result;
a request that failed gets one event with `error` set and leaves), `has_work()`, `running`, `waiting`.
`check_batch_memory` refuses a batch whose KV cache at the context does not fit the device, before the
batch is made.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from hybrimoe.engine.batch import DEFAULT_PREFILL_CHUNK, BatchEngine, BatchEvent
from hybrimoe.engine.types import SamplingParams, StreamChunk
from hybrimoe.errors import BudgetError

log = logging.getLogger(__name__)

GIB = 1024 ** 3


class Stepper(Protocol):
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int: ...
    def cancel(self, request_id: int) -> None: ...
    def step(self) -> list[BatchEvent]: ...
    def has_work(self) -> bool: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class SerialBatch:
    """The Stepper interface over `Engine.stream`: one request at a time, one chunk per step. A stream
    that raises ends its own request with an error event; a cancelled one is closed."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._next_id = 0
        self._queue: deque[tuple[int, Iterator[StreamChunk]]] = deque()
        self._current: tuple[int, Iterator[StreamChunk]] | None = None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        stream = iter(self.engine.stream(prompt_ids, params))  # the checks raise here, before any forward
        request_id = self._next_id
        self._next_id += 1
        self._queue.append((request_id, stream))
        return request_id

    def cancel(self, request_id: int) -> None:
        if self._current is not None and self._current[0] == request_id:
            self._close_current()
            return
        for entry in list(self._queue):
            if entry[0] == request_id:
                self._queue.remove(entry)
                _close(entry[1])

    def step(self) -> list[BatchEvent]:
        if self._current is None:
            if not self._queue:
                return []
            self._current = self._queue.popleft()
        request_id, stream = self._current
        try:
            chunk = next(stream)
        except StopIteration:
            self._close_current()
            return [_failed(request_id, RuntimeError("the engine's stream ended without a result"))]
        except Exception as exc:
            self._close_current()
            return [_failed(request_id, exc)]
        if chunk.result is not None:
            self._close_current()
        return [BatchEvent(request_id, chunk)]

    def has_work(self) -> bool:
        return self._current is not None or bool(self._queue)

    @property
    def running(self) -> int:
        return int(self._current is not None)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _close_current(self) -> None:
        if self._current is not None:
            _close(self._current[1])
            self._current = None


def _failed(request_id: int, error: Exception) -> BatchEvent:
    return BatchEvent(request_id, StreamChunk(token_ids=[], text=""), error=error)


def _close(stream: Iterator[StreamChunk]) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def make_stepper(engine: Any, max_batch: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Stepper:
    """SerialBatch for 1, else a BatchEngine of `max_batch` sequences taking `prefill_chunk` prompt tokens
    per step (its KV memory checked first)."""
    if max_batch == 1:
        return SerialBatch(engine)
    check_batch_memory(engine, max_batch, BatchEngine.kv_bytes(engine, max_batch))
    return BatchEngine(engine, max_batch, prefill_chunk)


def free_bytes_for(device: str) -> int | None:
    """Free memory where the KV cache lives: a CUDA device's free bytes, else the host's MemAvailable."""
    from hybrimoe.moe.budget import device_free_bytes
    from hybrimoe.moe.store import host_available_bytes

    free = device_free_bytes(device)
    return free if free is not None else host_available_bytes()


def check_batch_memory(engine: Any, max_batch: int, kv_bytes: int, free_bytes: int | None = None) -> None:
    """BudgetError (one line, with the numbers) when the KV cache of `max_batch` sequences at the
    engine's context (`kv_bytes` in all) exceeds the free memory of the engine's device."""
    device = str(getattr(getattr(engine, "options", None), "device", "cpu"))
    free = free_bytes_for(device) if free_bytes is None else free_bytes
    context = int(engine.max_context)
    log.info("--max-batch %d: KV cache %.3f GiB (%d sequences x %d tokens) on %s", max_batch, kv_bytes / GIB,
             max_batch, context, device)
    if free is not None and kv_bytes > free:
        raise BudgetError(f"--max-batch {max_batch} needs {kv_bytes / GIB:.2f} GiB of KV cache ({max_batch} sequences "
                          f"x {kv_bytes / max_batch / GIB:.3f} GiB at the context of {context} tokens), but {device} "
                          f"has {free / GIB:.2f} GiB free; lower --max-batch or --max-context")
