"""The tensors and graph of one GQA decoder layer's decode token on ggml (used by hybrimoe.models.ggml_decode).

    build_layer(lib, layer, contexts, buffers) -> (GgmlLayer, Q4_0 bytes) | reason   weights and stable tensors
    layer_graph(lib, GgmlLayer, x, kv, DecodeInputs, length, capacity, BoundCache, previous) -> graph

See hybrimoe.models.ggml_decode for what the graph computes and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrimoe.models.attention import Attention
from hybrimoe.models.ggml_kv import KVMirror, attend
from hybrimoe.models.layers import GatedMLP
from hybrimoe.models.quant_linear import QuantLinear
from hybrimoe.moe.ggml_kernels import GgmlLayerExperts, q4_0_blocks, q4_0_weights
from hybrimoe.moe.ggml_lib import GGML_F32, GGML_I32, ROPE_NEOX, SORT_DESCENDING, Ggml
from hybrimoe.moe.layer import MoEBlock

F32 = 4  # bytes


def q4_0_of(linear: nn.Module) -> np.ndarray | None:
    """A symmetric int4 CPU linear's Q4_0 blocks, else None."""
    if not isinstance(linear, QuantLinear) or linear.layout is None or linear.q.device.type != "cpu":
        return None
    return q4_0_blocks(linear.view())


@dataclass
class GgmlLayer:
    """One layer's weights (ggml tensors), its stable input/output tensors and their numpy views."""
    attn: Attention
    eps: tuple[float, float]  # input / post-attention RMSNorm
    rope_scale: float  # cos and sin times this (YaRN's magnitude correction; 1 otherwise)
    w_qkv: Any  # Q4_0 [(Hq+2Hkv)D rows, H]
    w_o: Any  # Q4_0 [H rows, Hq*D]
    mlp: dict[str, Any]  # the dense MLP's or shared expert's Q4_0 gate_up [2I rows, H], down [H rows, I]; or {}
    floats: dict[str, Any]  # in_w, post_w [H]; qkv_b; q_norm, k_norm; rope [D/2]; router [E rows, H]
    io: dict[str, Any]  # delta, r2, n [H]; logits [E]; ids I32 [K], weights [1, K] (its routed experts)
    views: dict[str, np.ndarray]  # the same, [1, width] (ids int32 [K], weights [K])


@dataclass
class DecodeInputs:
    """Per-token inputs every layer's graph reads: the position and the attention mask."""
    position: Any  # I32 [1]: the rotary position and the cache row written
    mask: Any  # F16 [max_tokens]: 0 where attended, -inf elsewhere
    position_view: np.ndarray
    mask_view: np.ndarray


@dataclass
class BoundCache:
    """The KV cache the graphs are built on: per layer (k, v) as ggml tensors over torch's memory."""
    key: tuple[int, ...]
    tensors: list[tuple[Any, ...]]  # per layer (k, v) F32 [D, S, Hkv], and with a mirror its (K16, V^T16, v_rows)
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # torch's k, v [Hkv, S, D] per layer (kept alive: ggml reads them)
    keep: list[Any] = field(default_factory=list)  # the stacked experts the graphs read (their keys hold ids)
    graphs: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)  # (length, fused) -> graph per layer
    token_graphs: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # (length, experts) -> TokenGraph
    contexts: list[Any] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=list)
    allocators: list[Any] = field(default_factory=list)  # graph allocators (ggml_gallocr)
    mirror: KVMirror | None = None  # the cache in F16 (K, V^T), made when a token first attends to 512 rows


def build_layer(lib: Ggml, layer: nn.Module, contexts: list[Any], buffers: list[Any]) -> tuple[GgmlLayer, int] | str:
    """One layer's weights and stable tensors in ggml (appended to contexts/buffers), and its Q4_0 bytes;
    or why it cannot run as a ggml graph."""
    attn = layer.self_attn
    if not isinstance(attn, Attention):
        return f"{type(attn).__name__} attention"
    parts = [q4_0_of(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    o_blocks = q4_0_of(attn.o_proj)
    if any(p is None for p in parts) or o_blocks is None:
        return "q/k/v/o projections not symmetric int4 on the CPU (--dense-dtype q4_0)"
    if attn.o_proj.bias is not None:
        return "an o_proj bias (no supported family has one)"
    if attn.head_dim % 2:
        return f"head dim {attn.head_dim}: rotary pairs need an even one"
    qkv_blocks = np.concatenate(parts)  # [(Hq+2Hkv)D, H/32, 18]
    hidden, width = attn.o_proj.out_features, attn.o_proj.in_features
    rows = qkv_blocks.shape[0]
    biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
    experts = layer.mlp.gate.weight.shape[0] if isinstance(layer.mlp, MoEBlock) else 0
    f32 = {"in_w": layer.input_layernorm.weight, "post_w": layer.post_attention_layernorm.weight}
    if all(b is not None for b in biases):
        f32["qkv_b"] = torch.cat([b.float() for b in biases if b is not None])
    if attn.qk_norm in ("head", "full"):
        f32["q_norm"], f32["k_norm"] = attn.q_norm.weight, attn.k_norm.weight
    f32["rope"] = 1 / attn.rotary.inv_freq.float()  # [D/2]: theta_i = position / rope_i (rope_ext, base 1)
    if experts:
        f32["router"] = layer.mlp.gate.weight  # [E, H]
    mlp_mats = mlp_blocks(layer.mlp)
    if mlp_mats and isinstance(layer.mlp, MoEBlock):
        f32["shared_gate"] = layer.mlp.shared_expert_gate.weight  # [1, H]
    # weights: Q4_0 in the repack buffer, fp32 in a plain one; then the stable activations
    wq, wq_buffer, (w_qkv, w_o, *w_mlp) = q4_0_weights(
        lib, [(qkv_blocks, (hidden, rows)), (o_blocks, (width, hidden))] + mlp_mats, "a decoder layer's q/k/v/o")
    contexts.append(wq)
    buffers.append(wq_buffer)
    wf, io_ctx = lib.context(len(f32)), lib.context(6)
    contexts += [wf, io_ctx]
    floats, arrays = {}, {}
    for name, t in f32.items():
        arrays[name] = t.detach().float().contiguous().numpy()
        floats[name] = lib.ggml_new_tensor_2d(wf, GGML_F32, t.shape[-1], t.shape[0] if t.dim() == 2 else 1)
    widths = {"delta": hidden, "r2": hidden, "n": hidden} | ({"logits": experts} if experts else {})
    io = {name: lib.ggml_new_tensor_2d(io_ctx, GGML_F32, w, 1) for name, w in widths.items()}
    if experts:  # the routed experts, for a graph that computes them (layer l + 1's, `GgmlDecoder.hidden`)
        k = layer.mlp.config.top_k
        io["ids"] = lib.ggml_new_tensor_2d(io_ctx, GGML_I32, k, 1)
        io["weights"] = lib.ggml_new_tensor_3d(io_ctx, GGML_F32, 1, k, 1)
    for ctx in (wf, io_ctx):
        buffers.append(lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, lib.cpu_buffer_type))
        if not buffers[-1]:
            raise MemoryError("ggml could not allocate a decoder layer's tensors")
    for tensor, array in [(floats[k], arrays[k]) for k in floats]:
        assert lib.ggml_nbytes(tensor) == array.nbytes
        lib.ggml_backend_tensor_set(tensor, np.ascontiguousarray(array).ctypes.data, 0, array.nbytes)
    views = {name: lib.array(t, np.float32, (1, widths[name])) for name, t in io.items() if name in widths}
    if experts:
        views["ids"] = lib.array(io["ids"], np.int32, (k,))
        views["weights"] = lib.array(io["weights"], np.float32, (k,))
    for array in views.values():
        array[...] = 0  # ggml's memory comes uninitialised; layer 0's delta is read as zeros
    eps = (float(layer.input_layernorm.eps), float(layer.post_attention_layernorm.eps))
    rope_scale = float(attn.rotary.spec.cos_sin_scale)
    nbytes = qkv_blocks.nbytes + o_blocks.nbytes + sum(blocks.nbytes for blocks, _ in mlp_mats)
    return GgmlLayer(attn, eps, rope_scale, w_qkv, w_o, dict(zip(("gate_up", "down"), w_mlp)), floats, io, views), nbytes


def mlp_blocks(block: nn.Module) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """The Q4_0 blocks and ggml shapes of a dense MLP's or a Qwen2-MoE shared expert's gate_up [2I, H] and
    down [H, I] (for the whole-token graph, hybrimoe.models.ggml_token); [] where there is none or its
    linears are not symmetric int4 (then the token keeps the per-layer graphs)."""
    mlp = block.shared_expert if isinstance(block, MoEBlock) else block if isinstance(block, GatedMLP) else None
    if mlp is None:
        return []
    gate, up, down = (q4_0_of(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if gate is None or up is None or down is None:
        return []
    width, hidden = mlp.down_proj.in_features, mlp.down_proj.out_features
    return [(np.concatenate([gate, up]), (hidden, 2 * width)), (down, (width, hidden))]


def mlp_ops(lib: Ggml, ctx: Any, w: GgmlLayer, n: Any) -> Any:
    """down(silu(gate(n)) * up(n)) [H, 1] from n [H, 1] with the layer's dense MLP or shared expert."""
    return lib.ggml_mul_mat(ctx, w.mlp["down"], lib.ggml_swiglu(ctx, lib.ggml_mul_mat(ctx, w.mlp["gate_up"], n)))


def layer_graph(lib: Ggml, w: GgmlLayer, x: Any, kv: tuple[Any, ...], shared: DecodeInputs, length: int,
           capacity: int, owned: BoundCache, previous: tuple[GgmlLayerExperts, GgmlLayer] | None) -> Any:
    """Layer `w`'s graph attending to the first `length` cache rows (of `capacity`); x: its input [H] (the
    previous layer's r2). `previous`: that layer's stacked experts and tensors: its routed experts' sum is
    computed here (from its n, ids and weights) instead of read from delta."""
    ctx = lib.context(128, graph_nodes=128)
    owned.contexts.append(ctx)
    if previous is None:
        delta = w.io["delta"]
    else:
        stacked, prev = previous
        hidden = prev.views["n"].shape[1]
        delta = stacked.combine_ops(ctx, lib.ggml_reshape_3d(ctx, prev.io["n"], hidden, 1, 1), prev.io["ids"],
                                    prev.io["weights"], prev.views["ids"].shape[0])
    writes: list[Any] = []
    r2, n = attention_ops(lib, ctx, w, lib.ggml_add(ctx, x, delta), kv, shared, length, capacity, writes)
    graph = lib.ggml_new_graph_custom(ctx, 128, False)
    for write in writes:
        lib.ggml_build_forward_expand(graph, write)
    lib.ggml_build_forward_expand(graph, lib.ggml_cpy(ctx, r2, w.io["r2"]))
    lib.ggml_build_forward_expand(graph, lib.ggml_cpy(ctx, n, w.io["n"]))
    if "logits" in w.io:
        lib.ggml_build_forward_expand(graph, lib.ggml_cpy(ctx, lib.ggml_mul_mat(ctx, w.floats["router"], n),
                                                          w.io["logits"]))
    lib.allocate_graph(graph, [], owned.allocators)  # (its outputs are copies into the io tensors)
    return graph


def attention_ops(lib: Ggml, ctx: Any, w: GgmlLayer, r1: Any, kv: tuple[Any, ...], shared: DecodeInputs,
                  length: int, capacity: int, writes: list[Any]) -> tuple[Any, Any]:
    """Layer `w`'s ops in `ctx` from its residual stream r1 F32 [H, 1] (the layer's input plus the previous
    block's output) to (r2 = r1 + attention [H, 1], n = RMSNorm_post(r2) [H, 1]), attending to the first
    `length` cache rows (of `capacity`); the token's k/v are written into the cache (kv: the layer's fp32
    k, v and, where there is one, its F16 mirror: hybrimoe.models.ggml_kv.attend), the writes nothing in
    the graph reads appended to `writes`."""
    attn = w.attn
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    f = w.floats
    a = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, r1, w.eps[0]), f["in_w"])
    qkv = lib.ggml_mul_mat(ctx, w.w_qkv, a)
    if "qkv_b" in f:
        qkv = lib.ggml_add(ctx, qkv, f["qkv_b"])
    q = lib.ggml_view_1d(ctx, qkv, hq * d, 0)
    k = lib.ggml_view_1d(ctx, qkv, hkv * d, hq * d * F32)
    v = lib.ggml_view_1d(ctx, qkv, hkv * d, (hq + hkv) * d * F32)
    norm_eps = float(attn.q_norm.eps) if attn.qk_norm in ("head", "full") else 0.0
    if attn.qk_norm == "full":
        q = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, q, norm_eps), f["q_norm"])
        k = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, k, norm_eps), f["k_norm"])
    if attn.clip is not None:
        q, k, v = (lib.ggml_clamp(ctx, t, -float(attn.clip), float(attn.clip)) for t in (q, k, v))
    q, k = lib.ggml_reshape_2d(ctx, q, d, hq), lib.ggml_reshape_2d(ctx, k, d, hkv)
    if attn.qk_norm == "head":
        q = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, q, norm_eps), f["q_norm"])
        k = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, k, norm_eps), f["k_norm"])
    q, k = (lib.ggml_rope_ext(ctx, lib.ggml_reshape_3d(ctx, t, d, heads, 1), shared.position, f["rope"], d,
                              ROPE_NEOX, 0, 1.0, 1.0, 0.0, w.rope_scale, 0.0, 0.0) for t, heads in ((q, hq), (k, hkv)))
    out = attend(lib, ctx, q, k, v, (hq, hkv, d), kv, shared, length, capacity, float(attn.scale), writes)
    o = lib.ggml_mul_mat(ctx, w.w_o, lib.ggml_reshape_2d(ctx, out, hq * d, 1))
    r2 = lib.ggml_add(ctx, r1, o)
    return r2, lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, r2, w.eps[1]), f["post_w"])


def route_ops(lib: Ggml, ctx: Any, logits: Any, experts: int, k: int, renormalise: bool,
              scale: float) -> tuple[Any, Any, Any, Any]:
    """The softmax top-k router (hybrimoe.models.routing.route without DeepSeek's rules) in `ctx`, as
    llama.cpp's graph computes it: logits F32 [E, 1] -> (ids I32 [k, 1], highest score first; weights
    F32 [1, k, 1]; scores F32 [E, 1] = softmax(logits); order I32 [E, 1], every expert by descending score:
    ids is a view of its first k)."""
    scores = lib.ggml_soft_max(ctx, logits)
    order = lib.ggml_argsort(ctx, scores, SORT_DESCENDING)  # I32 [E, 1]
    ids = lib.ggml_view_2d(ctx, order, k, 1, experts * 4, 0)  # its first k (ggml_argsort_top_k's view)
    weights = lib.ggml_get_rows(ctx, lib.ggml_reshape_3d(ctx, scores, 1, experts, 1), ids)  # [1, k, 1]
    if renormalise:
        flat = lib.ggml_reshape_2d(ctx, weights, k, 1)
        weights = lib.ggml_reshape_3d(ctx, lib.ggml_div(ctx, flat, lib.ggml_sum_rows(ctx, flat)), 1, k, 1)
    if scale != 1.0:
        weights = lib.ggml_scale(ctx, weights, scale)
    return ids, weights, scores, order
