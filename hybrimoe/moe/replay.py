"""Trace replay: the MoE layers use a recorded routing instead of their own gates' choice.

For benchmarks without a real checkpoint (`--dummy-weights`): random weights route almost uniformly,
real models do not; replaying a real trace gives the expert activity (popularity, reuse across
tokens, per-expert token counts in prefill) of the recorded model.

    TraceRouting(trace, moe_layers, num_experts)
      model MoE layer i-th  ->  trace MoE layer (i mod trace layers)-th
      tokens: every token of every sequence, in order, cycling; a forward pass of T tokens takes the
      next T tokens of the trace (each layer keeps its own cursor, so all layers of one pass agree)
      returns expert_ids [T, K] long, weights [T, K] fp32, scores [T, E] fp32 or None (not recorded)
    install_replay(model, routing, runtime=None): wraps every MoEBlock's executor; the block's own
      router still runs (its cost is real) but its choice is replaced before the executor sees it.

K is the trace's top-k (it may differ from the model's; the executor takes any K). A trace whose
expert ids do not fit the model's expert count is a TraceError.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from hybrimoe.errors import TraceError
from hybrimoe.trace.format import RoutingTrace

log = logging.getLogger(__name__)


class TraceRouting:
    def __init__(self, trace: RoutingTrace, moe_layers: tuple[int, ...] | list[int], num_experts: int,
                 name: str = "") -> None:
        self.name = name or trace.header.model
        trace_layers = sorted(trace.header.moe_layers) or sorted({l for t in trace.tokens for l in t.layers})
        if not trace_layers:
            raise TraceError(f"trace {self.name} has no MoE layers")
        self.layer_map = {layer: trace_layers[i % len(trace_layers)] for i, layer in enumerate(moe_layers)}
        k = trace.header.top_k
        tokens = [t for seq in sorted(trace.sequences().items()) for t in seq[1]
                  if all(len(t.layers.get(tl, _EMPTY).experts) == k for tl in set(self.layer_map.values()))]
        if not tokens:
            raise TraceError(f"trace {self.name}: no token routes every mapped layer with top-{k}")
        self.k, self.num_tokens = k, len(tokens)
        self.ids: dict[int, torch.Tensor] = {}  # model layer -> [N, K] long
        self.weights: dict[int, torch.Tensor] = {}  # model layer -> [N, K] fp32
        self.scores: dict[int, torch.Tensor | None] = {}  # model layer -> [N, E] fp32 or None
        for layer, tl in self.layer_map.items():
            routes = [t.layers[tl] for t in tokens]
            ids = torch.tensor([r.experts for r in routes], dtype=torch.long)
            if int(ids.max()) >= num_experts or int(ids.min()) < 0:
                raise TraceError(f"trace {self.name} uses expert {int(ids.max())} but the model has "
                                 f"{num_experts} experts per layer")
            self.ids[layer] = ids
            self.weights[layer] = torch.tensor([r.weights for r in routes], dtype=torch.float32)
            have_scores = all(r.scores is not None and len(r.scores) == num_experts for r in routes)
            self.scores[layer] = torch.tensor([r.scores for r in routes], dtype=torch.float32) if have_scores else None
        self._cursor = {layer: 0 for layer in self.layer_map}
        if trace.header.num_experts != num_experts or len(trace_layers) != len(self.layer_map):
            log.warning("replaying %s (%d MoE layers x %d experts, top-%d) on a model with %d MoE layers x %d "
                        "experts: layers map cyclically, experts by id", self.name, len(trace_layers),
                        trace.header.num_experts, k, len(self.layer_map), num_experts)

    @classmethod
    def load(cls, path: str | os.PathLike, moe_layers: tuple[int, ...] | list[int], num_experts: int) -> TraceRouting:
        from hybrimoe.trace.importers import load_any_trace

        return cls(load_any_trace(path), moe_layers, num_experts, name=os.path.basename(os.fspath(path)))

    def take(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The next `tokens` routes of `layer`: ids [T, K], weights [T, K], scores [T, E] or None."""
        start = self._cursor[layer]
        index = (torch.arange(tokens) + start) % self.num_tokens  # [T]
        self._cursor[layer] = (start + tokens) % self.num_tokens
        scores = self.scores[layer]
        return self.ids[layer][index], self.weights[layer][index], None if scores is None else scores[index]

    def peek(self, layer: int, tokens: int) -> torch.Tensor:
        """Expert ids [T, K] the next call of `layer` will get (the cursor does not move)."""
        index = (torch.arange(tokens) + self._cursor[layer]) % self.num_tokens
        return self.ids[layer][index]

    def rewind(self) -> None:
        self._cursor = {layer: 0 for layer in self._cursor}

    def frequency(self) -> dict[tuple[int, int], float]:
        """{(model layer, expert): activations over the whole trace} (e.g. for a static hot set)."""
        freq: dict[tuple[int, int], float] = {}
        for layer, ids in self.ids.items():
            for e, n in enumerate(torch.bincount(ids.reshape(-1)).tolist()):
                if n:
                    freq[(layer, e)] = float(n)
        return freq


class _NoRoute:
    experts: tuple[int, ...] = ()


_EMPTY = _NoRoute()


class ReplayExecutor:
    """Executor wrapper: replaces (expert_ids, weights) by the trace's, then calls the inner executor."""

    def __init__(self, inner: Any, routing: TraceRouting, runtime: Any = None) -> None:
        self.inner = inner
        self.routing = routing
        self.runtime = runtime

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ids, w, scores = self.routing.take(layer, x.shape[0])
        if self.runtime is not None:
            self.runtime.set_scores(layer, scores)  # the cache policy sees the trace's scores, not the gate's
        # the trace's routing stays on the host (the hybrid executor plans there, the reference executor computes
        # where the store lives); the gate's own choice is read back once, the one sync real routing costs
        expert_ids.to("cpu")
        return self.inner.run(layer, x, ids, w)


def install_replay(model: Any, routing: TraceRouting, runtime: Any = None) -> TraceRouting:
    """Wrap every MoE block's executor of `model` with the trace's routing."""
    for block in model.moe_blocks.values():
        block.executor = ReplayExecutor(block.executor, routing, runtime)
    return routing
