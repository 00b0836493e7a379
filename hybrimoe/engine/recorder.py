"""Routing recorder: writes, for every token and MoE layer, the experts the model used.

The engine brackets each forward pass with `begin_step(phase, start_pos, token_ids)` and
`end_step()`; in between, the model's `routing_observer` delivers one `RoutingRecord` per MoE layer
(`expert_ids [T,K]`, `weights [T,K]`, `scores [T,E]`). `end_step` turns the step into T
`TokenRouting` lines of the trace (docs/TRACE_FORMAT.md). Each request is one sequence (`seq`).
The trace file appears only when the recorder closes without error.
"""

from __future__ import annotations

import logging
import os
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
        self._seq = 0
        self._tokens_in_seq = 0  # tokens written for the current sequence
        self._step: tuple[str, int, list[int]] | None = None  # (phase, start_pos, token ids)
        self._layers: dict[int, tuple[list[list[int]], list[list[float]], list[list[float]] | None]] = {}
        self.tokens_written = 0

    # -- engine side ---------------------------------------------------------------------------
    def begin_step(self, phase: str, start_pos: int, token_ids: list[int]) -> None:
        assert phase in PHASES, phase
        assert self._step is None, "begin_step twice without end_step"
        self._step = (phase, start_pos, list(token_ids))
        self._layers = {}

    def observe(self, layer: int, record: Any) -> None:
        """The model's `routing_observer`: one call per MoE layer per forward pass."""
        if self._step is None:
            return  # a forward the engine did not announce (e.g. a warm-up): not part of the trace
        n_tokens = len(self._step[2])
        expert_ids = record.expert_ids.detach().to("cpu", torch.long)  # [T, K]
        weights = record.weights.detach().to("cpu", torch.float32)  # [T, K]
        assert expert_ids.shape[0] == n_tokens, (expert_ids.shape, n_tokens)
        scores = None
        if self.keep_scores and getattr(record, "scores", None) is not None:
            scores = record.scores.detach().to("cpu", torch.float32).tolist()  # [T, E]
        self._layers[int(layer)] = (expert_ids.tolist(), weights.tolist(), scores)

    def end_step(self) -> None:
        assert self._step is not None, "end_step without begin_step"
        phase, start_pos, token_ids = self._step
        missing = sorted(set(self.header.moe_layers) - set(self._layers))
        if missing:
            log.warning("routing recorder: no routing seen for MoE layers %s at pos %d", missing, start_pos)
        for t, token_id in enumerate(token_ids):
            layers = {layer: LayerRouting(experts=ids[t], weights=w[t], scores=None if s is None else s[t])
                      for layer, (ids, w, s) in sorted(self._layers.items())}
            self._writer.write(TokenRouting(seq=self._seq, pos=start_pos + t, phase=phase, layers=layers,
                                            token_id=int(token_id)))
        self._tokens_in_seq += len(token_ids)
        self.tokens_written += len(token_ids)
        self._step = None
        self._layers = {}

    def cancel_step(self) -> None:
        """Forget a step whose forward pass failed."""
        self._step = None
        self._layers = {}

    def end_sequence(self) -> None:
        if self._tokens_in_seq:
            self._seq += 1
        self._tokens_in_seq = 0

    # -- file life cycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._writer.close()
        log.info("routing trace: %d tokens in %d sequence(s) -> %s", self.tokens_written,
                 self._seq + (1 if self._tokens_in_seq else 0), self._writer.path)

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> "RoutingRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
