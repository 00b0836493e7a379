"""One MoE layer: route -> (observe) -> execute routed experts -> + shared experts.

The block owns the router and the shared experts; the routed experts live in the `ExpertStore` and are
computed by an executor (`ReferenceExecutor` here; the hybrid CPU/GPU runtime supplies another one
with the same `run` signature). Shapes: T = tokens, H = hidden, E = routed experts, K = experts/token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hybrimoe.config import ModelConfig
from hybrimoe.models.layers import GatedMLP
from hybrimoe.models.routing import route
from hybrimoe.moe.store import ExpertStore


@dataclass(frozen=True)
class RoutingRecord:
    layer: int
    expert_ids: torch.Tensor   # [T, K] long: experts actually used
    weights: torch.Tensor      # [T, K] fp32: combine weights
    scores: torch.Tensor       # [T, E] fp32: full router score vector (softmax, or sigmoid for DeepSeek-V3)


RoutingObserver = Callable[[int, RoutingRecord], None]


class Executor(Protocol):
    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], expert_ids [T, K], weights [T, K] -> [T, H]:
        out[t] = sum_k weights[t, k] * f_{expert_ids[t, k]}(x[t])."""
        ...


def expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [N, H] -> down @ (silu(gate @ x) * (up @ x)), [N, H].

    When `up` directly follows `gate` in memory (the store's and the cache slots' layout), both are
    read by ONE matmul over the [2I, H] view: one pass over the weights, one kernel fewer.
    """
    rows, hidden = gate.shape
    if (up.shape == gate.shape and gate.is_contiguous() and up.is_contiguous()
            and up.data_ptr() == gate.data_ptr() + gate.numel() * gate.element_size()):
        gate_up = gate.as_strided((2 * rows, hidden), (hidden, 1))       # [2I, H]
        g, u = F.linear(x, gate_up).split(rows, dim=-1)                    # [N, I] each
        return F.linear(F.silu(g) * u, down)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def add_rows(out: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> None:
    """out[tokens] += rows (tokens may repeat). A one-token batch (decode) adds directly: index_add_ on
    the CPU costs 40 us to 1 ms per call for one [1, H] row (a parallel region), add_ ~9 us."""
    if out.shape[0] == 1:
        out.add_(rows.sum(dim=0, keepdim=True) if rows.shape[0] > 1 else rows)
    else:
        out.index_add_(0, tokens, rows)


def group_by_expert(expert_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """expert_ids [T, K] -> [(expert, flat slot indices into the [T*K] assignments)], ascending expert.

    Token of slot s is s // K; its weight is weights.view(-1)[s].
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()
    groups, start = [], 0
    for expert, n in enumerate(counts):
        if n:
            groups.append((expert, order[start:start + n]))
            start += n
    return groups


class ReferenceExecutor:
    """Computes every activated expert on the store's device, one expert (and its tokens) at a time."""

    def __init__(self, store: ExpertStore) -> None:
        self.store = store

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
        home = self.store.layer_tensor(layer).device
        if x.device != home:   # dense layers elsewhere (e.g. GPU): compute the experts where they live
            out = self.run(layer, x.to(home), expert_ids.to(home), weights.to(home))
            return out.to(x.device)
        if x.shape[0] != 1:
            return self.run_grouped(layer, x, expert_ids, weights)
        # decode: no grouping; ascending expert id, the same sums as `run_grouped`
        stacked = self.store.layer_kernel(layer)
        if stacked is not None:  # ggml's stacked layer: the routed experts and their sum in one call
            return stacked.combine(x, expert_ids.view(-1).tolist(), weights.reshape(-1))
        out = torch.zeros_like(x)                                         # [1, H]
        flat_w = weights.reshape(-1)                                      # [K]
        ids = expert_ids.view(-1).tolist()
        for j in sorted(range(expert_ids.shape[1]), key=ids.__getitem__):
            y = self.store.expert(layer, ids[j]).forward(x)               # [1, H]
            out.add_((y * flat_w[j:j + 1, None]).to(out.dtype))         # [1, 1] weight: fp32 product as below
        return out

    def run_grouped(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        """The general path (any token count, x on the store's device): each activated expert once over
        the tokens routed to it."""
        k = expert_ids.shape[1]
        out = torch.zeros_like(x)                                         # [T, H]
        flat_w = weights.reshape(-1)                                      # [T*K]
        for expert, slots in group_by_expert(expert_ids):
            tokens = slots // k                                           # [N]
            y = self.store.expert(layer, expert).forward(x[tokens])       # [N, H]
            add_rows(out, tokens, (y * flat_w[slots, None]).to(out.dtype))
        return out


@dataclass
class MoEHooks:
    """State shared by every MoE block of one model."""
    observer: RoutingObserver | None = None
    prefill: bool | None = None  # the running forward carries prompt tokens; None outside a forward


class Router(nn.Module):
    """Gate weights [E, H] kept in fp32 (and DeepSeek-V3's score correction bias [E])."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32))
        if config.topk_method == "noaux_tc":
            bias = torch.zeros(config.num_experts, dtype=torch.float32)   # [E], added before top-k only
            self.register_buffer("e_score_correction_bias", bias)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)                            # [T, E] fp32


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, executor: Executor, hooks: MoEHooks) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.executor = executor
        self.hooks = hooks
        self.gate = Router(config)
        self.shared_expert: GatedMLP | None = None
        self.shared_experts: GatedMLP | None = None
        if config.shared_expert_gated:   # Qwen2-MoE: one shared expert with a sigmoid gate
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        elif config.shared_expert_intermediate_size:   # DeepSeek: n_shared_experts fused into one MLP
            self.shared_experts = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        return self.from_logits(x, self.gate(x))

    def route_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] fp32 -> (expert_ids [T, K], weights [T, K] fp32), told to the observer."""
        expert_ids, weights, scores = route(logits, self.config, self.gate.e_score_correction_bias)
        self.observe(expert_ids, weights, scores)
        return expert_ids, weights

    def observe(self, expert_ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> None:
        """Tells the observer (if any) this block's routing: expert_ids [T, K], weights [T, K], scores [T, E]."""
        if self.hooks.observer is not None:
            self.hooks.observer(self.layer_idx, RoutingRecord(self.layer_idx, expert_ids, weights, scores))

    def simple_router(self) -> bool:
        """Softmax, top-k, optional renormalisation and scale: no DeepSeek group or bias rules."""
        return not self.config.uses_deepseek_router and self.gate.e_score_correction_bias is None

    def routed_only(self) -> bool:
        """The block's output is its routed experts' weighted sum (no shared expert)."""
        return self.shared_expert is None and self.shared_experts is None

    def from_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The block after its router: x [T, H], logits [T, E] fp32 (the onnxruntime decode graph computes
        them, `hybrimoe.models.ort_decode`) -> [T, H]."""
        expert_ids, weights = self.route_logits(logits)
        out = self.executor.run(self.layer_idx, x, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
