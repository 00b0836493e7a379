"""One decode token of a GQA decoder layer with its matmuls on ggml (`--cpu-kernel ggml`, CPU only).

The onnxruntime decode graph (hybrimoe.models.ort_decode) computes q/k/v/o with MatMulNBits, which on the
2-vCPU Zen 4 reads int4 at ~10-15 GB/s against ~30 for ggml's repacked Q4_0 kernels. With dense weights in
q4_0 (`--dense-dtype q4_0`: symmetric int4, ggml's Q4_0 blocks) each layer's token runs as

    ggml  pre   r1 = x + delta;  a = RMSNorm_in(r1);  qkv = a @ [Wq; Wk; Wv]^T (+ b)
    onnx  attn  the family's q/k norms and clip, GroupQueryAttention on our KV cache (ort_decode.attention_ops)
    ggml  post  r2 = r1 + attn @ Wo^T;  n = RMSNorm_post(r2);  logits = n @ Wr^T (fp32 router)

with every buffer shared in place (onnxruntime reads qkv from and writes attn into ggml's tensors). Routing,
experts and dense MLPs stay where OrtDecoder leaves them (torch, the executor). Numerics: the int4 matmuls
round their input to Q8_0 per 32 (hybrimoe.moe.ggml_kernels); norms and the router are fp32 (ggml's
rms_norm sums squares in double). Memory: ggml holds a Q4_0 copy of q/k/v/o (logged), next to the
onnxruntime sessions that prompts use.
"""

from __future__ import annotations

import ctypes as C
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrimoe.models.attention import Attention
from hybrimoe.models.ort_decode import (DecodeLayer, OrtDecoder, _bind, _Graph, attention_inputs, attention_ops,
                                        attention_outputs)
from hybrimoe.models.quant_linear import QuantLinear
from hybrimoe.moe import ort_kernels
from hybrimoe.moe.ggml_kernels import REPACK_ROWS, q4_0_blocks
from hybrimoe.moe.ggml_lib import BUFFER_USAGE_WEIGHTS, GGML_F32, GGML_Q4_0, Ggml, ggml_runtime
from hybrimoe.moe.layer import MoEBlock

log = logging.getLogger(__name__)


def _blocks(linear: nn.Module) -> np.ndarray | None:
    if not isinstance(linear, QuantLinear) or linear.layout is None or linear.q.device.type != "cpu":
        return None
    return q4_0_blocks(linear.view())


@dataclass
class _Layer:
    """One layer's ggml graphs and the numpy views of its activation tensors (fp32)."""
    contexts: list[Any]  # ggml contexts (weights, activations) and buffers, kept alive
    buffers: list[Any]
    pre: Any  # graph: x, delta -> r1, qkv
    post: Any  # graph: attn, r1 -> r2, n, logits
    x: np.ndarray  # [1, H]
    views: dict[str, np.ndarray]  # delta, qkv, attn, r2, n [, logits]


def _layer(lib: Ggml, layer: nn.Module) -> tuple[_Layer, int] | str:
    """The ggml graphs of one decoder layer (and the Q4_0 bytes they hold), or why it has none."""
    attn = layer.self_attn
    if not isinstance(attn, Attention):
        return f"{type(attn).__name__} attention"
    parts = [_blocks(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    o_blocks = _blocks(attn.o_proj)
    if any(p is None for p in parts) or o_blocks is None:
        return "q/k/v/o projections not symmetric int4 on the CPU (--dense-dtype q4_0)"
    if attn.o_proj.bias is not None:
        return "an o_proj bias (no supported family has one)"
    if attn.head_dim % 16:
        return f"head dim {attn.head_dim}: GroupQueryAttention's rotary needs a multiple of 16"
    qkv_blocks = np.concatenate(parts)  # [(Hq+2Hkv)D, H/32, 18]
    hidden, width = attn.o_proj.out_features, attn.o_proj.in_features
    rows = qkv_blocks.shape[0]
    biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
    experts = layer.mlp.gate.weight.shape[0] if isinstance(layer.mlp, MoEBlock) else 0
    f32 = {"in_w": layer.input_layernorm.weight, "post_w": layer.post_attention_layernorm.weight}
    if all(b is not None for b in biases):
        f32["qkv_b"] = torch.cat([b.float() for b in biases if b is not None])
    if experts:
        f32["router"] = layer.mlp.gate.weight  # [E, H]
    # weights: Q4_0 in the repack buffer, fp32 in a plain one
    wq = lib.context(2)
    w_qkv = lib.ggml_new_tensor_2d(wq, GGML_Q4_0, hidden, rows)
    w_o = lib.ggml_new_tensor_2d(wq, GGML_Q4_0, width, hidden)
    repack = lib.repack_buffer_type is not None and rows % REPACK_ROWS == 0 and hidden % REPACK_ROWS == 0
    wf = lib.context(len(f32))
    floats = {}
    for name, t in f32.items():
        t = t.detach().float().contiguous()
        floats[name] = (lib.ggml_new_tensor_2d(wf, GGML_F32, t.shape[-1], t.shape[0] if t.dim() == 2 else 1),
                        t.numpy())
    buffers = [lib.ggml_backend_alloc_ctx_tensors_from_buft(wq, lib.repack_buffer_type if repack else lib.cpu_buffer_type),
               lib.ggml_backend_alloc_ctx_tensors_from_buft(wf, lib.cpu_buffer_type)]
    if not all(buffers):
        raise MemoryError("ggml could not allocate a decoder layer's weights")
    lib.ggml_backend_buffer_set_usage(buffers[0], BUFFER_USAGE_WEIGHTS)
    for tensor, array in [(w_qkv, qkv_blocks), (w_o, o_blocks), *floats.values()]:
        assert lib.ggml_nbytes(tensor) == array.nbytes
        lib.ggml_backend_tensor_set(tensor, np.ascontiguousarray(array).ctypes.data, 0, array.nbytes)
    # activations: one context, two graphs
    ctx = lib.context(24, graph_nodes=32)
    x = lib.ggml_new_tensor_2d(ctx, GGML_F32, hidden, 1)
    delta = lib.ggml_new_tensor_2d(ctx, GGML_F32, hidden, 1)
    attn_in = lib.ggml_new_tensor_2d(ctx, GGML_F32, width, 1)
    r1 = lib.ggml_add(ctx, x, delta)
    a = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, r1, float(layer.input_layernorm.eps)), floats["in_w"][0])
    qkv = lib.ggml_mul_mat(ctx, w_qkv, a)
    if "qkv_b" in floats:
        qkv = lib.ggml_add(ctx, qkv, floats["qkv_b"][0])
    o = lib.ggml_mul_mat(ctx, w_o, attn_in)
    r2 = lib.ggml_add(ctx, r1, o)
    n = lib.ggml_mul(ctx, lib.ggml_rms_norm(ctx, r2, float(layer.post_attention_layernorm.eps)), floats["post_w"][0])
    logits = lib.ggml_mul_mat(ctx, floats["router"][0], n) if experts else None
    pre, post = lib.ggml_new_graph_custom(ctx, 16, False), lib.ggml_new_graph_custom(ctx, 16, False)
    lib.ggml_build_forward_expand(pre, qkv)
    for out in (r2, n) + ((logits,) if logits is not None else ()):
        lib.ggml_build_forward_expand(post, out)
    buffers.append(lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend))
    if not buffers[-1]:
        raise MemoryError("ggml could not allocate a decoder layer's activations")

    def view(tensor: Any, width: int) -> np.ndarray:
        return np.ctypeslib.as_array(C.cast(lib.ggml_get_data(tensor), C.POINTER(C.c_float)), (1, width))

    views = {"delta": view(delta, hidden), "qkv": view(qkv, rows), "attn": view(attn_in, width),
             "r2": view(r2, hidden), "n": view(n, hidden)}
    if logits is not None:
        views["logits"] = view(logits, experts)
    for array in views.values():
        array[...] = 0  # ggml's memory comes uninitialised; layer 0's delta is read as zeros
    return _Layer([wq, wf, ctx], buffers, pre, post, view(x, hidden), views), qkv_blocks.nbytes + o_blocks.nbytes


def _attention_session(attn: Attention, rows: int) -> Any:
    from onnx import TensorProto, helper

    g = _Graph()
    flat = attention_ops(g, attn, "qkv")
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, rows])]
    inputs += attention_inputs(attn.num_kv_heads, attn.head_dim)
    outputs = [helper.make_tensor_value_info(flat, TensorProto.FLOAT, [1, attn.num_heads * attn.head_dim])]
    outputs += attention_outputs(attn.num_kv_heads, attn.head_dim)
    return ort_kernels.graph_session(g.nodes, g.inits, g.feeds, inputs, outputs), flat


class GgmlDecoder(OrtDecoder):
    """OrtDecoder with each layer's matmuls on ggml: `run_layer` = ggml pre, onnxruntime attention, ggml post."""

    def __init__(self, model: nn.Module, layers: list[DecodeLayer], x: torch.Tensor, lib: Ggml,
                 ggml_layers: list[_Layer]) -> None:
        super().__init__(model, layers, x)
        self.lib, self.ggml_layers = lib, ggml_layers
        self.x_view = x.numpy()

    @classmethod
    def build(cls, model: nn.Module) -> GgmlDecoder | None:
        """The graphs of `model` (on the CPU), or None (logged) when a layer cannot have them."""
        if model.device.type != "cpu":
            return None
        lib = ggml_runtime()
        built, total = [], 0
        for i, layer in enumerate(model.model.layers):
            got = _layer(lib, layer)
            if isinstance(got, str):
                log.info("ggml decode graphs: not used (layer %d: %s)", i, got)
                return None
            built.append(got[0])
            total += got[1]
        x = torch.zeros(1, model.model.layers[0].post_attention_layernorm.weight.shape[0])
        layers = []
        for g, layer in zip(built, model.model.layers):
            session, flat = _attention_session(layer.self_attn, g.views["qkv"].shape[1])
            io = session.io_binding()
            _bind(io, "qkv", g.views["qkv"])
            _bind(io, flat, g.views["attn"], output=True)
            tensors = {k: torch.from_numpy(v) for k, v in g.views.items()}  # shared with ggml, no copies
            layers.append(DecodeLayer(session, io, tensors["delta"], tensors["r2"], tensors["n"], tensors.get("logits")))
        log.info("ggml decode graphs: %d layers, %.1f MB of q/k/v/o as Q4_0", len(layers), total / 1e6)
        decoder = cls(model, layers, x, lib, built)
        for g in built:
            lib.owner(decoder, g.contexts, g.buffers)  # freed with the decoder
        return decoder

    def run_layer(self, index: int, decode: DecodeLayer) -> None:
        g = self.ggml_layers[index]
        g.x[...] = self.x_view if index == 0 else self.ggml_layers[index - 1].views["r2"]
        with self.lib.lock:
            for graph in (g.pre, None, g.post):
                if graph is None:
                    decode.session.run_with_iobinding(decode.io)
                elif self.lib.ggml_backend_graph_compute(self.lib.backend, graph) != 0:
                    raise RuntimeError("ggml graph compute failed")
