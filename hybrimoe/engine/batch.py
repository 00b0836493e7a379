"""Continuous batching: several requests share each forward pass of one `Engine`'s model.

    submit ─► waiting ─► (free slot) ─► running: prefill chunks ─► one decode token per step ─► leaves
                                                    └──────────── step(): one forward for all ─┘

Each running sequence has its own `SequenceState` (KV cache, sampler, seed, stop handling), the
same object `Engine.stream` drives, so a request's chunks are those its solo `Engine.stream` gives.
A step takes one decode token from every decoding sequence and at most `prefill_chunk` prompt
tokens of the joining ones (oldest first), so a long prompt joins over several steps while the
running streams keep getting a token per step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from hybrimoe.engine.forward import Segment, forward_segments
from hybrimoe.engine.sequence import SequenceState
from hybrimoe.engine.types import SamplingParams, StreamChunk
from hybrimoe.errors import ConfigError
from hybrimoe.models.kv_cache import kv_bytes_per_token, kv_cache_dtype

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per step, shared by the requests joining (running ones keep decoding)


@dataclass
class BatchEvent:
    """What `BatchEngine.step` returns per request: one chunk as `Engine.stream` yields it (the request's
    last chunk has `finish_reason` and `result`), or, with `error` set, the failure that ended the request
    (then `chunk` is empty; no event follows)."""

    request_id: int
    chunk: StreamChunk
    error: Exception | None = None


class BatchEngine:
    """Up to `max_batch` sequences decoding together over `engine`'s model (docs/CONTRACTS.md, "Batch").

    Not thread-safe, except `cancel`, which only marks the request (the next `step` drops it). While a
    BatchEngine runs, do not call `engine.stream` / `engine.generate`: they share the model and runtime."""

    def __init__(self, engine: Any, max_batch: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be an integer >= 1 (prompt tokens per step), got {prefill_chunk!r}")
        self.engine = engine
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._next_id = 0
        self._waiting: deque[tuple[int, SequenceState]] = deque()
        self._running: dict[int, SequenceState] = {}  # in admission order
        self._cancelled: set[int] = set()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Checks prompt and params as `Engine.stream` does (same errors, before anything runs);
        returns a request id. The request waits until a sequence slot is free."""
        seq = SequenceState(self.engine, self.engine.check_request(prompt_ids, params), params)
        request_id = self._next_id
        self._next_id += 1
        self._waiting.append((request_id, seq))
        return request_id

    def cancel(self, request_id: int) -> None:
        """The request leaves at the next step (its slot is freed, no more events). Unknown or finished
        ids are ignored: a request may finish before its cancel arrives."""
        self._cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def running(self) -> int:
        """Sequences holding a slot (prefilling or decoding)."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Submitted requests without a slot yet."""
        return len(self._waiting)

    @staticmethod
    def kv_bytes(engine: Any, max_batch: int) -> int:
        """KV cache bytes `max_batch` sequences of `engine.max_context` tokens need (in the cache's dtype:
        fp32 for a half-precision GQA model on the CPU, `kv_cache_dtype`)."""
        model = engine.model
        device = next(model.parameters()).device
        dtype = kv_cache_dtype(model.config.attention, model.dtype, device)
        return max_batch * engine.max_context * kv_bytes_per_token(model.config, dtype)

    # -- stepping --------------------------------------------------------------------------------
    def step(self) -> list[BatchEvent]:
        """One forward pass: a prefill chunk of joining requests plus one decode token of every running
        sequence. Returns the events of this step, in slot order."""
        self._drop_cancelled()
        while self._waiting and len(self._running) < self.max_batch:
            request_id, seq = self._waiting.popleft()
            self._running[request_id] = seq
        planned = self._plan()
        if not planned:
            return []
        start = time.perf_counter()
        try:
            logits = self._forward([segment for _, _, segment in planned])  # [S, V]
        except Exception as exc:  # the whole forward failed: every sequence in it ends with the error
            log.warning("batch step of %d sequences failed: %s", len(planned), exc)
            return [self._fail(request_id, exc) for request_id, _, _ in planned]
        seconds = time.perf_counter() - start  # every sequence of the step waited this long
        events: list[BatchEvent] = []
        for (request_id, seq, segment), row in zip(planned, logits):
            try:
                chunk = seq.advance(len(segment.ids), row, seconds)
            except Exception as exc:  # e.g. NonFiniteLogitsError in this sequence's sampling
                events.append(self._fail(request_id, exc))
                continue
            if chunk is None:
                continue  # a prefill chunk that ended mid-prompt
            if chunk.result is not None:
                self._leave(request_id)
                self.engine._account(chunk.result)
            events.append(BatchEvent(request_id, chunk))
        late = self._drop_cancelled()  # a cancel that arrived during the forward: no event for it
        return [e for e in events if e.request_id not in late]

    def _plan(self) -> list[tuple[int, SequenceState, Segment]]:
        """Decoding sequences take one token each; prefilling ones share `prefill_chunk` prompt tokens,
        oldest first (a sequence left without any waits for a later step)."""
        out: list[tuple[int, SequenceState, Segment]] = []
        room = self.prefill_chunk
        for request_id, seq in self._running.items():
            if seq.prefilling:
                if room == 0:
                    continue
                ids = seq.next_ids(room)
                room -= len(ids)
            else:
                ids = seq.next_ids()
            out.append((request_id, seq, Segment(request_id, ids, seq.pos, seq.kv, seq.phase)))
        return out

    def _forward(self, segments: list[Segment]) -> torch.Tensor:
        """Logits [S, V] of each segment's last token: one `forward_batch` over all of them."""
        if getattr(self.engine.runtime, "replay", None) is not None:
            raise ConfigError("--replay-trace replays one sequence's routing in order; it cannot drive a batch")
        with torch.inference_mode():
            return forward_segments(self.engine, segments)

    # -- leaving ---------------------------------------------------------------------------------
    def _leave(self, request_id: int) -> None:
        self._running.pop(request_id, None)
        if self.engine.recorder is not None:
            self.engine.recorder.end_sequence(request_id)

    def _fail(self, request_id: int, exc: Exception) -> BatchEvent:
        self._leave(request_id)
        return BatchEvent(request_id, StreamChunk(token_ids=[], text=""), error=exc)

    def _drop_cancelled(self) -> set[int]:
        """Removes the requests cancelled so far from the queue and the slots; returns their ids."""
        if not self._cancelled:
            return set()
        cancelled = set(self._cancelled)
        self._waiting = deque((i, s) for i, s in self._waiting if i not in cancelled)
        for request_id in cancelled:
            self._leave(request_id)
        self._cancelled -= cancelled
        return cancelled
