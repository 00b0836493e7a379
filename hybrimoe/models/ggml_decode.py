"""One decode token of a GQA decoder layer as ONE ggml graph (`--cpu-kernel ggml`, CPU only).

The onnxruntime decode graph (hybrimoe.models.ort_decode) computes q/k/v/o with MatMulNBits, which on the
2-vCPU Zen 4 reads int4 at ~10-15 GB/s against ~30 for ggml's repacked Q4_0 kernels. With dense weights in
q4_0 (`--dense-dtype q4_0`: symmetric int4, ggml's Q4_0 blocks) each layer's token runs as one graph

    r1 = x + delta;  a = RMSNorm_in(r1);  q, k, v = a @ [Wq; Wk; Wv]^T (+ b)
    the family's q/k norms and clip;  q, k rotated (ggml_rope_ext, rotate-half pairs) by our own frequencies
    k, v written into our KV cache at the position (ggml_set_rows, in place)
    attn = softmax(q k^T * scale + mask) v over the cache (ggml_flash_attn_ext; mask: causal + window)
    r2 = r1 + attn @ Wo^T;  n = RMSNorm_post(r2);  logits = n @ Wr^T (fp32 router)

x is the previous layer's r2 tensor (or the embedding), delta the previous layer's MoE output, written by
torch into ggml's memory; r2, n and logits are copied into tensors whose memory torch reads in place.
Routing, experts and dense MLPs stay where OrtDecoder leaves them (torch, the executor).

The attended cache length is the position rounded up to KV_CHUNK (llama.cpp pads its KV view the same
way): one graph per layer and chunk count, built when first needed; masked positions are skipped by
flash attention's -inf test. Rotary: ggml_rope_ext in NEOX mode with base 1 and frequency factors
1 / inv_freq, so that angle i is position / (1 / inv_freq_i) (the model's own frequencies, YaRN's
included; our tables compute position * inv_freq_i: ~1 ulp apart) and cos/sin times YaRN's magnitude
scale. Numerics: the int4 matmuls round their input to Q8_0 per 32 (hybrimoe.moe.ggml_kernels); norms,
rotary, attention and the router are fp32 (ggml's rms_norm sums squares in double; its flash attention
accumulates in fp32 with an online softmax). Memory: ggml holds a
Q4_0 copy of q/k/v/o (logged), next to the kernels' copies that prompts use; the KV cache is shared.
"""

from __future__ import annotations

import ctypes as C
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrimoe.models.attention import Attention
from hybrimoe.models.kv_cache import KVCache
from hybrimoe.models.ort_decode import DecodeLayer, OrtDecoder
from hybrimoe.models.quant_linear import QuantLinear
from hybrimoe.moe.ggml_kernels import REPACK_ROWS, q4_0_blocks
from hybrimoe.moe.ggml_lib import (BUFFER_USAGE_WEIGHTS, GGML_F16, GGML_F32, GGML_I32, GGML_Q4_0, ROPE_NEOX, Ggml,
                                   ggml_runtime)
from hybrimoe.moe.layer import MoEBlock

log = logging.getLogger(__name__)

KV_CHUNK = 256  # tokens: the attended cache length is a multiple of this (one graph per multiple)
F32 = 4  # bytes


def _blocks(linear: nn.Module) -> np.ndarray | None:
    if not isinstance(linear, QuantLinear) or linear.layout is None or linear.q.device.type != "cpu":
        return None
    return q4_0_blocks(linear.view())


def _floats(view: Any, shape: tuple[int, ...], lib: Ggml) -> np.ndarray:
    """A numpy view of an allocated fp32 ggml tensor (torch reads and writes ggml's memory in place)."""
    return np.ctypeslib.as_array(C.cast(lib.ggml_get_data(view), C.POINTER(C.c_float)), shape)


@dataclass
class _Layer:
    """One layer's weights (ggml tensors), its stable input/output tensors and their numpy views."""
    attn: Attention
    eps: tuple[float, float]  # input / post-attention RMSNorm
    rope_scale: float  # cos and sin times this (YaRN's magnitude correction; 1 otherwise)
    w_qkv: Any  # Q4_0 [(Hq+2Hkv)D rows, H]
    w_o: Any  # Q4_0 [H rows, Hq*D]
    floats: dict[str, Any]  # in_w, post_w [H]; qkv_b; q_norm, k_norm; rope [D/2]; router [E rows, H]
    io: dict[str, Any]  # delta, r2, n [H]; logits [E]
    views: dict[str, np.ndarray]  # the same, [1, width] fp32


@dataclass
class _Shared:
    """Per-token inputs every layer's graph reads: the position and the attention mask."""
    position: Any  # I32 [1]: the rotary position and the cache row written
    mask: Any  # F16 [max_tokens]: 0 where attended, -inf elsewhere
    position_view: np.ndarray
    mask_view: np.ndarray


@dataclass
class _Bound:
    """The KV cache the graphs are built on: per layer (k, v) as ggml tensors over torch's memory."""
    key: tuple[int, ...]
    tensors: list[tuple[Any, Any]]
    keep: list[torch.Tensor]  # torch's buffers, kept alive while ggml reads them
    graphs: dict[int, list[Any]] = field(default_factory=dict)  # attended length -> graph per layer
    contexts: list[Any] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=list)


def _layer(lib: Ggml, layer: nn.Module, contexts: list[Any], buffers: list[Any]) -> tuple[_Layer, int] | str:
    """One layer's weights and stable tensors in ggml (appended to contexts/buffers), and its Q4_0 bytes;
    or why it cannot run as a ggml graph."""
    attn = layer.self_attn
    if not isinstance(attn, Attention):
        return f"{type(attn).__name__} attention"
    parts = [_blocks(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    o_blocks = _blocks(attn.o_proj)
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
    # weights: Q4_0 in the repack buffer, fp32 in a plain one; then the stable activations
    wq, wf, io_ctx = lib.context(2), lib.context(len(f32)), lib.context(4)
    contexts += [wq, wf, io_ctx]
    w_qkv = lib.ggml_new_tensor_2d(wq, GGML_Q4_0, hidden, rows)
    w_o = lib.ggml_new_tensor_2d(wq, GGML_Q4_0, width, hidden)
    repack = lib.repack_buffer_type is not None and rows % REPACK_ROWS == 0 and hidden % REPACK_ROWS == 0
    floats, arrays = {}, {}
    for name, t in f32.items():
        arrays[name] = t.detach().float().contiguous().numpy()
        floats[name] = lib.ggml_new_tensor_2d(wf, GGML_F32, t.shape[-1], t.shape[0] if t.dim() == 2 else 1)
    widths = {"delta": hidden, "r2": hidden, "n": hidden} | ({"logits": experts} if experts else {})
    io = {name: lib.ggml_new_tensor_2d(io_ctx, GGML_F32, w, 1) for name, w in widths.items()}
    for ctx, buft in ((wq, lib.repack_buffer_type if repack else lib.cpu_buffer_type), (wf, lib.cpu_buffer_type),
                      (io_ctx, lib.cpu_buffer_type)):
        buffers.append(lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft))
        if not buffers[-1]:
            raise MemoryError("ggml could not allocate a decoder layer's weights")
    lib.ggml_backend_buffer_set_usage(buffers[-3], BUFFER_USAGE_WEIGHTS)
    for tensor, array in [(w_qkv, qkv_blocks), (w_o, o_blocks)] + [(floats[k], arrays[k]) for k in floats]:
        assert lib.ggml_nbytes(tensor) == array.nbytes
        lib.ggml_backend_tensor_set(tensor, np.ascontiguousarray(array).ctypes.data, 0, array.nbytes)
    views = {name: _floats(t, (1, widths[name]), lib) for name, t in io.items()}
    for array in views.values():
        array[...] = 0  # ggml's memory comes uninitialised; layer 0's delta is read as zeros
    eps = (float(layer.input_layernorm.eps), float(layer.post_attention_layernorm.eps))
    rope_scale = float(attn.rotary.spec.cos_sin_scale)
    return _Layer(attn, eps, rope_scale, w_qkv, w_o, floats, io, views), qkv_blocks.nbytes + o_blocks.nbytes


def _graph(lib: Ggml, w: _Layer, x: Any, kv: tuple[Any, Any], shared: _Shared, length: int,
           capacity: int, owned: _Bound) -> Any:
    """Layer `w`'s graph attending to the first `length` cache rows (of `capacity`); x: its input [H]."""
    attn = w.attn
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    ctx = lib.context(96, graph_nodes=96)
    owned.contexts.append(ctx)
    f = w.floats
    r1 = lib.ggml_add(ctx, x, w.io["delta"])
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
    cache = [lib.ggml_set_rows(ctx, kv[i], lib.ggml_reshape_3d(ctx, t, d, 1, hkv), shared.position)
             for i, t in enumerate((k, v))]  # the new row written in place; views of the cache after it
    keys, values = (lib.ggml_view_3d(ctx, c, d, length, hkv, d * F32, capacity * d * F32, 0) for c in cache)
    mask = lib.ggml_view_2d(ctx, shared.mask, length, 1, length * 2, 0)
    out = lib.ggml_flash_attn_ext(ctx, lib.ggml_reshape_3d(ctx, q, d, 1, hq), keys, values, mask,
                                  float(attn.scale), 0.0, 0.0)  # [D, Hq, 1]
    o = lib.ggml_mul_mat(ctx, w.w_o, lib.ggml_reshape_2d(ctx, out, hq * d, 1))
    r2 = lib.ggml_add(ctx, r1, o)
    n = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, r2, w.eps[1]), f["post_w"])
    graph = lib.ggml_new_graph_custom(ctx, 96, False)
    lib.ggml_build_forward_expand(graph, lib.ggml_cpy(ctx, r2, w.io["r2"]))
    lib.ggml_build_forward_expand(graph, lib.ggml_cpy(ctx, n, w.io["n"]))
    if "logits" in w.io:
        lib.ggml_build_forward_expand(graph, lib.ggml_cpy(ctx, lib.ggml_mul_mat(ctx, f["router"], n), w.io["logits"]))
    owned.buffers.append(lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend))
    if not owned.buffers[-1]:
        raise MemoryError("ggml could not allocate a decoder layer's activations")
    return graph


class GgmlDecoder(OrtDecoder):
    """OrtDecoder whose `run_layer` computes a layer's whole token (projections, attention, router) as one
    ggml graph; no onnxruntime session."""

    def __init__(self, model: nn.Module, lib: Ggml, ggml_layers: list[_Layer], x: Any, contexts: list[Any],
                 buffers: list[Any]) -> None:
        layers = [DecodeLayer(None, None, *(torch.from_numpy(g.views[k]) for k in ("delta", "r2", "n")),
                              torch.from_numpy(g.views["logits"]) if "logits" in g.views else None)
                  for g in ggml_layers]
        hidden = ggml_layers[0].views["delta"].shape[1]
        super().__init__(model, layers, torch.from_numpy(_floats(x, (1, hidden), lib)))
        self.lib, self.ggml_layers, self.x_tensor = lib, ggml_layers, x
        self.contexts, self.buffers = contexts, buffers
        self.shared: _Shared | None = None
        self.bound: _Bound | None = None
        self.graphs: list[Any] = []
        lib.owner(self, contexts, buffers)  # freed with the decoder (the bound cache's graphs too)

    @classmethod
    def build(cls, model: nn.Module) -> GgmlDecoder | None:
        """The graphs of `model` (on the CPU), or None (logged) when a layer cannot have them."""
        if model.device.type != "cpu":
            return None
        lib = ggml_runtime()
        contexts: list[Any] = []
        buffers: list[Any] = []
        built, total = [], 0
        for i, layer in enumerate(model.model.layers):
            got = _layer(lib, layer, contexts, buffers)
            if isinstance(got, str):
                log.info("ggml decode graphs: not used (layer %d: %s)", i, got)
                lib.free(contexts, buffers)
                return None
            built.append(got[0])
            total += got[1]
        ctx = lib.context(1)
        contexts.append(ctx)
        x = lib.ggml_new_tensor_2d(ctx, GGML_F32, built[0].views["delta"].shape[1], 1)
        buffers.append(lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend))
        if not buffers[-1]:
            lib.free(contexts, buffers)
            raise MemoryError("ggml could not allocate the decoder's input")
        log.info("ggml decode graphs: %d layers, %.1f MB of q/k/v/o as Q4_0", len(built), total / 1e6)
        return cls(model, lib, built, x, contexts, buffers)

    def _bind_cache(self, kv: KVCache, end: int) -> _Bound:
        """The ggml tensors over kv's buffers (and the mask for its length), made again for a new cache."""
        pairs = [kv[i].buffers(end, self.kv_heads, self.head_dim, self.head_dim, torch.float32,
                               torch.device("cpu")) for i in range(len(self.layers))]
        key = tuple(x for k, v in pairs for x in (k.data_ptr(), v.data_ptr(), k.shape[1]))
        if self.bound is not None and self.bound.key == key:
            return self.bound
        self._unbind()
        lib, capacity = self.lib, pairs[0][0].shape[1]
        bound = _Bound(key, [], [t for pair in pairs for t in pair])
        lib.owner(bound, bound.contexts, bound.buffers)  # freed with it (or at once by _unbind)
        ctx = lib.context(2 * len(pairs) + 4)
        bound.contexts.append(ctx)
        for k, v in pairs:
            if k.dtype != torch.float32 or not (k.is_contiguous() and v.is_contiguous()):
                raise RuntimeError(f"the ggml decode graph needs contiguous fp32 KV buffers, got {k.dtype}")
            tensors = []
            for t in (k, v):
                tensor = lib.ggml_new_tensor_3d(ctx, GGML_F32, self.head_dim, capacity, self.kv_heads)
                buffer = lib.ggml_backend_cpu_buffer_from_ptr(t.data_ptr(), t.numel() * F32)
                bound.buffers.append(buffer)
                if not buffer or lib.ggml_backend_tensor_alloc(buffer, tensor, t.data_ptr()) != 0:
                    raise MemoryError("ggml could not wrap the KV cache")
                tensors.append(tensor)
            bound.tensors.append((tensors[0], tensors[1]))
        position, mask = lib.ggml_new_tensor_1d(ctx, GGML_I32, 1), lib.ggml_new_tensor_1d(ctx, GGML_F16, capacity)
        bound.buffers.append(lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend))
        if not bound.buffers[-1]:
            raise MemoryError("ggml could not allocate the decoder's inputs")
        self.shared = _Shared(position, mask,
                              np.ctypeslib.as_array(C.cast(lib.ggml_get_data(position), C.POINTER(C.c_int32)), (1,)),
                              np.ctypeslib.as_array(C.cast(lib.ggml_get_data(mask), C.POINTER(C.c_uint16)),
                                                    (capacity,)).view(np.float16))
        self.bound = bound
        return bound

    def _unbind(self) -> None:
        if self.bound is not None:
            self.lib.free(self.bound.contexts, self.bound.buffers)
            self.bound = self.shared = None
            self.graphs = []

    def _prepare(self, kv: KVCache, end: int) -> None:
        """This token's inputs (position end - 1): the cache bound, the position, the mask, the graphs."""
        bound = self._bind_cache(kv, end)
        shared = self.shared
        assert shared is not None
        capacity = int(shared.mask_view.shape[0])
        shared.position_view[0] = end - 1
        length = min(-(-end // KV_CHUNK) * KV_CHUNK, capacity)
        window = self.ggml_layers[0].attn.sliding_window
        shared.mask_view[:length] = -np.inf
        shared.mask_view[max(0, end - window) if window else 0:end] = 0  # attended: pos - j < window
        if length not in bound.graphs:
            inputs = [self.x_tensor] + [g.io["r2"] for g in self.ggml_layers[:-1]]  # layer l reads l - 1's r2
            bound.graphs[length] = [_graph(self.lib, g, x, kvt, shared, length, capacity, bound)
                                    for g, x, kvt in zip(self.ggml_layers, inputs, bound.tensors)]
        self.graphs = bound.graphs[length]

    def run_layer(self, index: int, decode: DecodeLayer) -> None:
        with self.lib.lock:
            if self.lib.ggml_backend_graph_compute(self.lib.backend, self.graphs[index]) != 0:
                raise RuntimeError("ggml graph compute failed")
