"""Routing recorder: writes, for every token and MoE layer, the experts the model used.

The engine brackets each forward pass with `begin_step(phase, start_pos, token_ids)` (one sequence)
or `begin_batch([(key, phase, start_pos, token_ids), ...])` (a batched step, segments in the order of
the forward's rows) and `end_step()`; in between, the model's `routing_observer` delivers one
`RoutingRecord` per MoE layer (`expert_ids [N,K]`, `weights [N,K]`, `scores [N,E]`, N = the step's
tokens). `end_step` turns the step into N `TokenRouting` lines of the trace (docs/TRACE_FORMAT.md),
each under its own sequence. Each request is one sequence (`seq`), numbered from 0 in the order their
first tokens were written; `end_sequence(key)` closes one (key None = the single-sequence mode). In
batch mode the lines of several sequences interleave in the file (readers group them by `seq`).
The trace file appears only when the recorder closes without error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from typing import Any

import torch

from hybrimoe.trace.format import PHASES, LayerRouting, TokenRouting, TraceHeader, TraceWriter

log = logging.getLogger(__name__)


def header_for(config: Any, model_name: str, source: str = "hybrimoe recorder") -> TraceHeader:
    """Trace header from a ModelConfig (num_layers counts dense layers too)."""
    return TraceHeader(model=model_name, num_layers=int(config.num_layers), num_experts=int(config.num_experts),
                       top_k=int(config.top_k), moe_layers=[int(x) for x in config.moe_layers], source=source)


class RoutingRecorder:
    """Collects routing records of one model and streams them into a `TraceWriter`."""

    def __init__(self, path: str | os.PathLike, header: TraceHeader, keep_scores: bool = True) -> None:
        self.header = header
        self.keep_scores = keep_scores
        self._writer = TraceWriter(path, header)
        self._next_seq = 0  # number of the next sequence that writes a token
        self._open: dict[Hashable, int] = {}  # key -> seq of sequences with tokens written, not yet ended
        self._step: list[tuple[Hashable, str, int, list[int]]] | None = None  # (key, phase, start_pos, ids)
        self._layers: dict[int, tuple[list[list[int]], list[list[float]], list[list[float]] | None]] = {}
        self.tokens_written = 0

    # -- engine side ---------------------------------------------------------------------------
    def begin_step(self, phase: str, start_pos: int, token_ids: list[int]) -> None:
        """One sequence's forward (the single-sequence mode, key None)."""
        self.begin_batch([(None, phase, start_pos, token_ids)])

    def begin_batch(self, segments: list[tuple[Hashable, str, int, list[int]]]) -> None:
        """A forward of several sequences: (key, phase, start_pos, token ids) per segment, in row order."""
        assert self._step is None, "begin_step twice without end_step"
        assert all(phase in PHASES for _, phase, _, _ in segments), segments
        self._step = [(key, phase, start, list(ids)) for key, phase, start, ids in segments]
        self._layers = {}

    def observe(self, layer: int, record: Any) -> None:
        """The model's `routing_observer`: one call per MoE layer per forward pass."""
        if self._step is None:
            return  # a forward the engine did not announce (e.g. a warm-up): not part of the trace
        n_tokens = sum(len(ids) for _, _, _, ids in self._step)
        expert_ids = record.expert_ids.detach().to("cpu", torch.long)  # [N, K]
        weights = record.weights.detach().to("cpu", torch.float32)  # [N, K]
        assert expert_ids.shape[0] == n_tokens, (expert_ids.shape, n_tokens)
        scores = None
        if self.keep_scores and getattr(record, "scores", None) is not None:
            scores = record.scores.detach().to("cpu", torch.float32).tolist()  # [N, E]
        self._layers[int(layer)] = (expert_ids.tolist(), weights.tolist(), scores)

    def end_step(self) -> None:
        assert self._step is not None, "end_step without begin_step"
        missing = sorted(set(self.header.moe_layers) - set(self._layers))
        if missing:
            log.warning("routing recorder: no routing seen for MoE layers %s at pos %d", missing, self._step[0][2])
        row = 0  # row of the step's routing records
        for key, phase, start_pos, token_ids in self._step:
            if token_ids and key not in self._open:
                self._open[key] = self._next_seq
                self._next_seq += 1
            for t, token_id in enumerate(token_ids):
                layers = {layer: LayerRouting(experts=ids[row], weights=w[row], scores=None if s is None else s[row])
                          for layer, (ids, w, s) in sorted(self._layers.items())}
                self._writer.write(TokenRouting(seq=self._open[key], pos=start_pos + t, phase=phase, layers=layers,
                                                token_id=int(token_id)))
                row += 1
            self.tokens_written += len(token_ids)
        self._step = None
        self._layers = {}

    def cancel_step(self) -> None:
        """Forget a step whose forward pass failed."""
        self._step = None
        self._layers = {}

    def end_sequence(self, key: Hashable = None) -> None:
        """The sequence `key` ended: a later step under the same key starts a new sequence."""
        self._open.pop(key, None)

    # -- file life cycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._writer.close()
        log.info("routing trace: %d tokens in %d sequence(s) -> %s", self.tokens_written, self._next_seq,
                 self._writer.path)

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> "RoutingRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
