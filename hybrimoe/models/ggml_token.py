"""A whole decode token as ONE ggml graph: the plain CPU engine's fastest path (`--cpu-kernel ggml`).

    token_experts(model, layers) -> [GgmlLayerExperts | None per layer] | None   may this token be one graph?
    token_graph(lib, layers, blocks, experts, x, kv, shared, length, capacity, owned, head) -> TokenGraph

Where every MoE block is a softmax top-k router over its routed experts (Mixtral, Qwen3-MoE, OLMoE, and
Qwen2-MoE with its gated shared expert; no DeepSeek rules) on the plain engine's `ReferenceExecutor` with
each layer's experts stacked in ggml (`GgmlLayerExperts`), and every dense MLP layer and shared expert has
Q4_0 weights (`--dense-dtype q4_0`), the token's whole forward is one graph, as llama.cpp builds it
(llama-graph.cpp, `build_moe_ffn`):

    r = embedding;  per layer:  r2, n = attention_ops(r)  (hybrimoe.models.ggml_layer)
        MoE:    scores = softmax(n @ Wr^T);  ids = argsort_top_k(scores, K);  weights = scores[ids]
                (/ their sum where norm_topk_prob; * routed_scaling_factor);  m = sum_k weights_k expert_ids_k(n)
                (+ sigmoid(n . w_gate) * shared(n) for Qwen2-MoE)
        dense:  m = down(silu(gate(n)) * up(n))
        r = r2 + m
    hidden = r  (before the final norm; with `head`, logits = lm_head(RMSNorm(r)))

One graph call per token instead of one per layer, and no torch between layers: on the 2-vCPU Zen 3 the
torch routing, the observer call and the Python between the per-layer graphs cost ~1.7 of ~16.6 ms per
token. The router's numerics are llama.cpp's (ggml_soft_max in fp32; the top-k sorts the scores); the
experts are summed highest score first (the torch path sums by ascending expert id: a rounding apart).
The routing is read back and told to the observer after the graph, layer by layer, only when one is
installed (a routing trace being recorded); the hybrid runtime swaps executors, so it never runs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrimoe.models.ggml_layer import BoundCache, DecodeInputs, GgmlLayer, attention_ops, mlp_ops, route_ops
from hybrimoe.models.layers import GatedMLP
from hybrimoe.moe.ggml_kernels import GgmlLayerExperts
from hybrimoe.moe.ggml_lib import Ggml
from hybrimoe.moe.layer import MoEBlock, ReferenceExecutor

NODES_PER_LAYER = 96  # graph nodes (and context tensors) per layer, with room; plus 2 per routed expert


@dataclass
class TokenGraph:
    """One token's graph over a bound cache and its outputs' numpy views (ggml's memory, rewritten by each
    compute): the hidden state and, per layer, its routing."""
    graph: Any
    out: np.ndarray  # [1, H] fp32: the last layer's residual stream (before the final norm); or, with the
    #                  head in the graph, the logits [1, V] fp32
    blocks: list[MoEBlock]  # the MoE blocks, in layer order (dense MLP layers have no routing)
    ids: list[np.ndarray]  # per MoE block int32 [K], highest score first
    weights: list[np.ndarray]  # per MoE block fp32 [K]
    scores: list[np.ndarray]  # per MoE block fp32 [E]


def token_experts(model: nn.Module, layers: list[GgmlLayer]) -> list[GgmlLayerExperts | None] | None:
    """Per layer its stacked ggml experts (None for a dense MLP layer) where the whole token may be one graph,
    else None: every MoE block a simple router over its routed experts (and a Qwen2-MoE shared expert) on the
    plain engine's executor, every dense MLP or shared expert with Q4_0 weights in ggml (`GgmlLayer.mlp`);
    checked per token (the hybrid runtime swaps executors)."""
    stacked: list[GgmlLayerExperts | None] = []
    for layer, weights in zip(model.model.layers, layers):
        block = layer.mlp
        if isinstance(block, GatedMLP) and weights.mlp:
            stacked.append(None)
            continue
        if not (isinstance(block, MoEBlock) and block.shared_experts is None and block.simple_router()
                and (block.shared_expert is None or weights.mlp) and type(block.executor) is ReferenceExecutor):
            return None
        experts = block.executor.store.layer_kernel(block.layer_idx)
        if experts is None:
            return None
        stacked.append(experts)
    return stacked if any(e is not None for e in stacked) else None


def token_graph(lib: Ggml, layers: list[GgmlLayer], blocks: list[nn.Module], experts: list[GgmlLayerExperts | None],
                x: Any, kv: list[tuple[Any, ...]], shared: DecodeInputs, length: int, capacity: int,
                owned: BoundCache, head: tuple[Any, float, Any] | None = None) -> TokenGraph:
    """The graph of one token from its embedding x F32 [H, 1] through every layer, attending to the first
    `length` cache rows (of `capacity`); its context and activations are owned by the bound cache.
    `head`: (the final RMSNorm's weight F32 [H, 1], its eps, lm_head's Q4_0 weight [H -> V]): the graph
    ends with them and outputs logits."""
    k = max(b.config.top_k for b in blocks if isinstance(b, MoEBlock))
    nodes = len(layers) * (NODES_PER_LAYER + 2 * k) + 32
    ctx = lib.context(nodes, graph_nodes=nodes)
    owned.contexts.append(ctx)
    routing, writes = [], []
    r, delta = x, None
    for w, block, stacked, cache in zip(layers, blocks, experts, kv):
        r1 = r if delta is None else lib.ggml_add(ctx, r, delta)
        r, n = attention_ops(lib, ctx, w, r1, cache, shared, length, capacity, writes)
        if stacked is None:  # a dense MLP layer
            delta = mlp_ops(lib, ctx, w, n)
            continue
        config = block.config
        logits = lib.ggml_mul_mat(ctx, w.floats["router"], n)  # [E, 1] fp32
        ids, weights, scores, order = route_ops(lib, ctx, logits, config.num_experts, config.top_k,
                                                config.norm_topk_prob, float(config.routed_scaling_factor))
        hidden = w.views["n"].shape[1]
        delta = stacked.combine_ops(ctx, lib.ggml_reshape_3d(ctx, n, hidden, 1, 1), ids, weights, config.top_k)
        if w.mlp:  # Qwen2-MoE's shared expert: + sigmoid(n . w_gate) * shared(n), as MoEBlock.from_logits adds it
            gate = lib.ggml_sigmoid(ctx, lib.ggml_mul_mat(ctx, w.floats["shared_gate"], n))  # [1, 1]
            delta = lib.ggml_add(ctx, delta, lib.ggml_mul(ctx, mlp_ops(lib, ctx, w, n), gate))
        routing.append((block, order, weights, scores, config))
    assert delta is not None
    out = lib.ggml_add(ctx, r, delta)
    if head is not None:
        norm, eps, lm_head = head
        out = lib.ggml_mul_mat(ctx, lm_head, lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, out, eps), norm))  # [V, 1]
    graph = lib.ggml_new_graph_custom(ctx, nodes, False)
    for write in writes:
        lib.ggml_build_forward_expand(graph, write)
    lib.ggml_build_forward_expand(graph, out)
    lib.allocate_graph(graph, [out] + [t for route in routing for t in route[1:4]], owned.allocators)
    width = lib.ggml_nbytes(out) // 4
    return TokenGraph(graph, lib.array(out, np.float32, (1, width)), [route[0] for route in routing],
                      [lib.array(order, np.int32, (c.top_k,)) for _, order, _, _, c in routing],
                      [lib.array(w, np.float32, (c.top_k,)) for _, _, w, _, c in routing],
                      [lib.array(s, np.float32, (c.num_experts,)) for _, _, _, s, c in routing])


def observe_token(token: TokenGraph) -> None:
    """Tells the observer (if any) each MoE block's routing the graph computed, in layer order, as copies."""
    if not token.blocks or token.blocks[0].hooks.observer is None:
        return
    for block, ids, weights, scores in zip(token.blocks, token.ids, token.weights, token.scores):
        block.observe(torch.from_numpy(ids.astype(np.int64)).view(1, -1), torch.from_numpy(weights.copy()).view(1, -1),
                      torch.from_numpy(scores.copy()).view(1, -1))
