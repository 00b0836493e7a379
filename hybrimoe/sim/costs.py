"""What the simulator needs to know about time: per-layer expert costs, dense time, LM head.

`SimCosts` is a protocol; `ProfileCosts` adapts the project's `CostModel` (a named hardware
profile such as paper-a6000) and a `ModelShape`; `UniformCosts` is a hand-set version for tests
and small experiments. All results in seconds. `with_cuda_graphs()` gives the costs of forwards
that replay a captured CUDA graph (a preset's `cuda_graphs`: kTransformers' decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hybrimoe.policy.plan import ExpertCosts, LinearCosts


class SimCosts(Protocol):
    expert_bytes: int  # bytes of one routed expert (what a copy moves)

    def experts(self, layer: int) -> ExpertCosts:
        """The layer's routed-expert costs (CPU, GPU, copy)."""
        ...

    def dense(self, layer: int, tokens: int, context: int) -> float:
        """GPU seconds of everything but the routed experts: attention, norms, router, shared
        experts (dense MLP for dense layers), for `tokens` new tokens after `context` cached ones."""
        ...

    def dense_decode(self, layer: int, contexts: tuple[int, ...]) -> float:
        """GPU seconds of the same part for one decode step of len(contexts) sequences, one new token
        each after contexts[i] cached ones (batch 1: `dense(layer, 1, contexts[0])`)."""
        ...

    def lm_head(self, tokens: int) -> float:
        """GPU seconds of the final norm + LM head over `tokens` positions whose logits are needed
        (a prompt: 1, its last; a decode step of B sequences: B)."""
        ...

    def with_cuda_graphs(self) -> "SimCosts":
        """The costs of forwards that replay a captured CUDA graph (graph-captured launch overheads)."""
        ...


@dataclass(frozen=True)
class UniformCosts:
    """Same LinearCosts for every layer, constant dense time per layer (seconds)."""

    expert: LinearCosts
    dense_seconds: float = 0.0
    lm_head_seconds: float = 0.0
    expert_bytes: int = 1
    graph: "UniformCosts | None" = None  # the costs under CUDA graphs (None: the same)

    def experts(self, layer: int) -> ExpertCosts:
        return self.expert

    def dense(self, layer: int, tokens: int, context: int) -> float:
        return self.dense_seconds

    def dense_decode(self, layer: int, contexts: tuple[int, ...]) -> float:
        return self.dense_seconds

    def lm_head(self, tokens: int) -> float:
        return self.lm_head_seconds

    def with_cuda_graphs(self) -> "UniformCosts":
        """`graph` (hand-set costs under CUDA graphs) when given, else the same costs."""
        return self.graph if self.graph is not None else self


class _Memo:
    """`ExpertCosts` with results memoised per token count (the scheduler asks the same often)."""

    def __init__(self, inner: ExpertCosts) -> None:
        self._inner = inner
        self._cpu: dict[tuple[int, bool], float] = {}
        self._gpu: dict[int, float] = {}
        self._copy = inner.copy()

    def cpu(self, tokens: int, first: bool) -> float:
        key = (tokens, first)
        if key not in self._cpu:
            self._cpu[key] = self._inner.cpu(tokens, first)
        return self._cpu[key]

    def gpu(self, tokens: int) -> float:
        if tokens not in self._gpu:
            self._gpu[tokens] = self._inner.gpu(tokens)
        return self._gpu[tokens]

    def copy(self) -> float:
        return self._copy


class ProfileCosts:
    """`SimCosts` of a `ModelShape` under a `CostModel` profile (hybrimoe.policy.cost).

    Every MoE layer of a model has the same expert shape, so one memoised table serves all layers.
    Dense times are memoised per (layer, tokens, context), a decode step's per (layer, contexts).
    """

    def __init__(self, cost_model, shape) -> None:
        self.cost_model, self.shape = cost_model, shape
        self._experts = _Memo(cost_model.expert_costs(shape))
        self.expert_bytes = int(round(shape.expert_bytes(cost_model.gpu_bits)))
        self._dense: dict[tuple, float] = {}  # (layer, tokens, context) or (layer, -1, decode contexts)
        self._graph: ProfileCosts | None = None

    def experts(self, layer: int) -> ExpertCosts:
        return self._experts

    def dense(self, layer: int, tokens: int, context: int) -> float:
        key = (layer, tokens, context)
        if key not in self._dense:
            self._dense[key] = self.cost_model.gpu_dense_time(self.shape, layer, tokens, context)
        return self._dense[key]

    def dense_decode(self, layer: int, contexts: tuple[int, ...]) -> float:
        key = (layer, -1, contexts)  # -1: not a token count (decode step of len(contexts) sequences)
        if key not in self._dense:
            self._dense[key] = self.cost_model.gpu_dense_time_batch(self.shape, layer, contexts)
        return self._dense[key]

    def lm_head(self, tokens: int) -> float:
        return self.cost_model.lm_head_time(self.shape, tokens)

    def with_cuda_graphs(self) -> "ProfileCosts":
        """The profile's graph-captured launch overheads (`CostModel.with_cuda_graphs`)."""
        if self._graph is None:
            self._graph = ProfileCosts(self.cost_model.with_cuda_graphs(), self.shape)
        return self._graph
