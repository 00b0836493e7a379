"""One decode token of a GQA decoder layer as ONE onnxruntime graph (`--cpu-kernel onnxruntime`, CPU only).

On the torch path a CPU decode token runs ~60 small ops per layer around the int4 matmuls (norms, rotary,
KV append, attention, residual adds, router): ~6-7 ms of a ~20 ms token on the 1 GB benchmark model, and
torch's CPU attention alone ~170 us per layer against ~25 us for onnxruntime's GroupQueryAttention (2-vCPU
AMD EPYC, benchmarks/RESULTS_formats.md). Here, per layer, everything from the residual add before the
attention to the router logits is one graph run:

    r1     = x + delta                    delta: the previous layer's MLP/MoE output (zeros for layer 0)
    a      = RMSNorm_in(r1)               SkipSimplifiedLayerNormalization (it also returns r1)
    q,k,v  = split(MatMulNBits(a, [Wq; Wk; Wv]) [+ b])
             [q/k RMSNorm over the full width (OLMoE) | clip (OLMoE) | q/k RMSNorm per head (Qwen3)]
    o      = GroupQueryAttention(q, k, v, cache)  rotary from our own cos/sin tables (YaRN included), the
                                                 new k/v written into our `LayerKV` buffers in place,
                                                 Mistral's sliding window as `local_window_size`
    r2     = r1 + MatMulNBits(o, Wo) [+ b]
    n      = RMSNorm_post(r2)             SkipSimplifiedLayerNormalization
    logits = n @ Wr^T                     MoE layers only (fp32 router)

Outputs r2, n [1, H] and logits [1, E] (fp32) land in preallocated buffers (IO binding); layer l + 1 reads
layer l's r2 in place. Routing, the routed experts (whatever executor the model has: the plain one or the
hybrid runtime's), shared experts and dense MLPs stay in torch, so observers, policies and placements see
exactly what the torch path shows them. Numerics: the residual stream stays fp32 here (the torch path
rounds it to the model's dtype after every add); the int4 matmuls are the same MatMulNBits as
`OrtMatmul`'s. Only one sequence's one-token forwards take this path (the plain engine's decode); prompts
and batched steps run the torch path on the same KV cache.

Memory: the graphs hold onnxruntime's own packed copy of q/k/v/o next to the stacked q/k/v and o_proj
sessions that prompts use (about 3% of a Mixtral-8x7B's int4 bytes; logged at build time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrimoe.errors import HybrimoeError
from hybrimoe.models.attention import Attention
from hybrimoe.models.kv_cache import KVCache
from hybrimoe.models.layers import RMSNorm
from hybrimoe.models.quant_linear import QuantLinear
from hybrimoe.moe import ort_kernels
from hybrimoe.moe.layer import MoEBlock

log = logging.getLogger(__name__)


class _Graph:
    """Nodes, initializers and external feeds of one onnx graph."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.int4_bytes = 0

    def const(self, name: str, array: np.ndarray | torch.Tensor) -> str:
        from onnx import numpy_helper

        if isinstance(array, torch.Tensor):
            array = array.detach().float().cpu().numpy()
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str], **attrs: Any) -> list[str]:
        from onnx import helper

        domain = "com.microsoft" if op_type in ("SkipSimplifiedLayerNormalization", "GroupQueryAttention") else ""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain, **attrs))
        return outputs

    def matmul(self, prefix: str, x: str, weights: ort_kernels.OrtInt4, biases: list[torch.Tensor | None]) -> str:
        """x @ W^T with onnxruntime's int4 kernel (+ the biases, concatenated, when any linear has one)."""
        self.nodes.append(ort_kernels.matmul_node(prefix, x, f"{prefix}_y", weights, self.inits, self.feeds))
        self.int4_bytes += weights.nbytes
        if all(b is None for b in biases):
            return f"{prefix}_y"
        assert all(b is not None for b in biases), "q/k/v biases come all or none"
        bias = self.const(f"{prefix}_bias", torch.cat([b.float() for b in biases if b is not None]))
        return self.op("Add", [f"{prefix}_y", bias], [f"{prefix}_yb"])[0]

    def rms(self, prefix: str, x: str, norm: RMSNorm, heads: int | None = None) -> str:
        """RMSNorm of x [1, W] over its full width, or per head of `norm`'s width when `heads` is given."""
        weight = self.const(f"{prefix}_w", norm.weight)
        if heads is None:
            return self.op("SimplifiedLayerNormalization", [x, weight], [f"{prefix}_y"], axis=-1,
                           epsilon=norm.eps, stash_type=1)[0]
        split = self.op("Reshape", [x, self.const(f"{prefix}_shape", np.array([1, heads, -1], np.int64))],
                        [f"{prefix}_heads"])[0]
        normed = self.op("SimplifiedLayerNormalization", [split, weight], [f"{prefix}_normed"], axis=-1,
                         epsilon=norm.eps, stash_type=1)[0]
        return self.op("Reshape", [normed, self.const(f"{prefix}_flat", np.array([1, -1], np.int64))],
                       [f"{prefix}_y"])[0]


def _int4(linear: nn.Module) -> ort_kernels.OrtInt4 | None:
    if not isinstance(linear, QuantLinear) or linear.layout is None or linear.q.device.type != "cpu":
        return None
    return ort_kernels.ort_int4_weights(linear.view())


def _layer_graph(layer: nn.Module) -> tuple[_Graph, list[Any], list[Any]] | str:
    """The graph of one decoder layer with its onnx inputs and outputs, or why it has none."""
    from onnx import TensorProto, helper

    attn = layer.self_attn
    if not isinstance(attn, Attention):
        return f"{type(attn).__name__} attention"
    qkv = ort_kernels.stack_int4([_int4(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    o_weights = _int4(attn.o_proj)
    if qkv is None or o_weights is None:
        return "q/k/v/o projections not int4 on the CPU with integer zero points (--dense-dtype int4)"
    hkv, d = attn.num_kv_heads, attn.head_dim
    if d % 16:
        return f"head dim {d}: GroupQueryAttention's rotary needs a multiple of 16"
    hidden = o_weights.n
    g = _Graph()
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, [1, hidden]),
              helper.make_tensor_value_info("delta", f32, [1, hidden])]
    a, _, _, r1 = g.op("SkipSimplifiedLayerNormalization", ["x", "delta", g.const("in_w", layer.input_layernorm.weight)],
                       ["a", "", "", "r1"], epsilon=layer.input_layernorm.eps)
    projected = g.matmul("qkv", a, qkv, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])  # [1, (Hq+2Hkv)D]
    inputs += attention_inputs(hkv, d)
    flat = attention_ops(g, attn, projected)                                                 # [1, Hq*D]
    o = g.matmul("o", flat, o_weights, [attn.o_proj.bias])
    g.op("SkipSimplifiedLayerNormalization", [o, r1, g.const("post_w", layer.post_attention_layernorm.weight)],
         ["n", "", "", "r2"], epsilon=layer.post_attention_layernorm.eps)
    outputs = [helper.make_tensor_value_info("r2", f32, [1, hidden]), helper.make_tensor_value_info("n", f32, [1, hidden])]
    if isinstance(layer.mlp, MoEBlock):
        g.op("MatMul", ["n", g.const("router_t", layer.mlp.gate.weight.t())], ["logits"])
        outputs.append(helper.make_tensor_value_info("logits", f32, [1, layer.mlp.gate.weight.shape[0]]))
    return g, inputs, outputs + attention_outputs(hkv, d)


def attention_inputs(hkv: int, d: int) -> list[Any]:
    """The cache, lengths and rotary tables an attention graph reads (fp32 cache [1, Hkv, max, D])."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    return [helper.make_tensor_value_info("past_k", f32, [1, hkv, None, d]),
            helper.make_tensor_value_info("past_v", f32, [1, hkv, None, d]),
            helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
            helper.make_tensor_value_info("cos", f32, [None, d // 2]),
            helper.make_tensor_value_info("sin", f32, [None, d // 2])]


def attention_outputs(hkv: int, d: int) -> list[Any]:
    from onnx import TensorProto, helper

    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, hkv, None, d])
            for name in ("present_k", "present_v")]


def attention_ops(g: _Graph, attn: Attention, projected: str) -> str:
    """The attention of one token from its projected q/k/v [1, (Hq+2Hkv)D] (biases added): the family's q/k
    norms and clip, GroupQueryAttention on the bound cache (rotary from our tables, the new k/v written in
    place, Mistral's window); returns the name of its output [1, Hq*D]."""
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    sizes = g.const("qkv_sizes", np.array([hq * d, hkv * d, hkv * d], np.int64))
    q, k, v = g.op("Split", [projected, sizes], ["q0", "k0", "v0"], axis=-1)
    if attn.qk_norm == "full":
        q, k = g.rms("q_norm", q, attn.q_norm), g.rms("k_norm", k, attn.k_norm)
    if attn.clip is not None:
        lo, hi = g.const("clip_lo", np.array(-attn.clip, np.float32)), g.const("clip_hi", np.array(attn.clip, np.float32))
        q, k, v = (g.op("Clip", [t, lo, hi], [f"{t}_clip"])[0] for t in (q, k, v))
    if attn.qk_norm == "head":
        q, k = g.rms("q_norm", q, attn.q_norm, hq), g.rms("k_norm", k, attn.k_norm, hkv)
    q, k, v = (g.op("Unsqueeze", [t, g.const(f"{t}_axis", np.array([0], np.int64))], [f"{t}_3d"])[0]
               for t in (q, k, v))                                                            # [1, 1, heads*D]
    g.op("GroupQueryAttention", [q, k, v, "past_k", "past_v", "seqlens", "total", "cos", "sin"],
         ["attn", "present_k", "present_v"], num_heads=hq, kv_num_heads=hkv, scale=float(attn.scale),
         do_rotary=1, rotary_interleaved=0, local_window_size=attn.sliding_window or -1)
    return g.op("Squeeze", ["attn", g.const("attn_axis", np.array([0], np.int64))], ["attn_2d"])[0]  # [1, Hq*D]


def _bind(io: Any, name: str, tensor: torch.Tensor | np.ndarray, output: bool = False) -> None:
    """Binds a contiguous CPU buffer by address (onnxruntime reads or writes it in place)."""
    array = tensor.numpy() if isinstance(tensor, torch.Tensor) else tensor
    assert array.flags.c_contiguous
    bind = io.bind_output if output else io.bind_input
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


@dataclass
class DecodeLayer:
    """One layer's session and its bound buffers (fp32): input delta [1, H] (its input x is the previous
    layer's r2, or the decoder's embedding buffer), outputs r2, n [1, H] and logits [1, E] (None for a
    dense layer)."""
    session: Any  # None for GgmlDecoder's layers (one ggml graph each)
    io: Any
    delta: torch.Tensor
    r2: torch.Tensor
    n: torch.Tensor
    logits: torch.Tensor | None
    kv_bound: tuple[int, ...] = ()  # (k address, v address, max_tokens) of the cache bound now
    tables_bound: tuple[int, ...] = ()  # (cos address, sin address, rows)


class OrtDecoder:
    """The decode graphs of every layer of one model; `hidden` runs a one-token forward through them."""

    def __init__(self, model: nn.Module, layers: list[DecodeLayer], x: torch.Tensor) -> None:
        self.layers = layers
        self.x = x                               # [1, H] fp32: the token's embedding, layer 0's input
        first = model.model.layers[0].self_attn
        self.rotary, self.kv_heads, self.head_dim = first.rotary, first.num_kv_heads, first.head_dim
        self.seqlens = np.zeros(1, np.int32)     # cached tokens before the new one (GQA: total - 1)
        self.total = np.zeros((), np.int32)      # cached + new
        self.cos = self.sin = torch.empty(0)     # [max_tokens, D/2] fp32, from the model's own Rotary
        for layer in layers:
            if layer.io is None:  # not an onnxruntime graph (GgmlDecoder's)
                continue
            _bind(layer.io, "seqlens", self.seqlens)
            _bind(layer.io, "total", self.total)

    @classmethod
    def build(cls, model: nn.Module) -> OrtDecoder | None:
        """The graphs of `model` (on the CPU), or None (logged) when a layer cannot have one."""
        if model.device.type != "cpu":
            return None
        built: list[tuple[_Graph, Any]] = []
        for i, layer in enumerate(model.model.layers):
            graph = _layer_graph(layer)
            if isinstance(graph, str):
                log.info("onnxruntime decode graph: not used (layer %d: %s)", i, graph)
                return None
            g, inputs, outputs = graph
            built.append((g, ort_kernels.graph_session(g.nodes, g.inits, g.feeds, inputs, outputs)))
        layers: list[DecodeLayer] = []
        x = torch.zeros(1, model.model.layers[0].post_attention_layernorm.weight.shape[0])
        for (g, session), layer in zip(built, model.model.layers):
            buffers = [torch.zeros_like(x) for _ in range(3)]  # delta, r2, n
            experts = layer.mlp.gate.weight.shape[0] if isinstance(layer.mlp, MoEBlock) else 0
            logits = torch.zeros(1, experts) if experts else None
            decode = DecodeLayer(session, session.io_binding(), *buffers, logits)
            _bind(decode.io, "x", layers[-1].r2 if layers else x)  # layer l + 1 reads layer l's r2
            _bind(decode.io, "delta", decode.delta)
            for name in ("r2", "n") + (("logits",) if logits is not None else ()):
                _bind(decode.io, name, getattr(decode, name), output=True)
            layers.append(decode)
        total = sum(g.int4_bytes for g, _ in built)
        log.info("onnxruntime decode graphs: %d layers, %.1f MB of int4 q/k/v/o packed again", len(layers), total / 1e6)
        return cls(model, layers, x)

    def _prepare(self, model: nn.Module, kv: KVCache, end: int) -> None:
        """Rotary tables covering kv's max_tokens, and every layer's cache bound (allocated on first use)."""
        if self.cos.shape[0] < kv.max_tokens:
            self.cos, self.sin = (t.float().contiguous() for t in self.rotary(torch.arange(kv.max_tokens)))
        for i, layer in enumerate(self.layers):
            k, v = kv[i].buffers(end, self.kv_heads, self.head_dim, self.head_dim, torch.float32, torch.device("cpu"))
            if k.dtype != torch.float32:
                raise HybrimoeError(f"the onnxruntime decode graph needs an fp32 KV cache, layer {i} holds {k.dtype}")
            if layer.kv_bound != (k.data_ptr(), v.data_ptr(), k.shape[1]):  # a new cache (shape in the key:
                for name, buffer in (("past_k", k), ("past_v", v)):          # memory can be reused at one address)
                    _bind(layer.io, name, buffer[None])
                    _bind(layer.io, name.replace("past", "present"), buffer[None], output=True)
                layer.kv_bound = (k.data_ptr(), v.data_ptr(), k.shape[1])
            if layer.tables_bound != (self.cos.data_ptr(), self.sin.data_ptr(), self.cos.shape[0]):
                _bind(layer.io, "cos", self.cos)
                _bind(layer.io, "sin", self.sin)
                layer.tables_bound = (self.cos.data_ptr(), self.sin.data_ptr(), self.cos.shape[0])

    def run_layer(self, index: int, decode: DecodeLayer) -> None:
        """Computes layer `index`'s r2, n and logits from its inputs (x: the previous r2 or the embedding)."""
        decode.session.run_with_iobinding(decode.io)

    def hidden(self, model: nn.Module, input_ids: torch.Tensor, start: int, kv: KVCache) -> torch.Tensor:
        """The hidden state [1, H] (model dtype, before the final norm) of one token at position `start`,
        its keys/values written into `kv` at `start`."""
        self._prepare(model, kv, start + 1)
        self.seqlens[0] = start
        self.total[...] = start + 1
        dtype = model.dtype
        self.x.copy_(model.model.embed_tokens(input_ids))
        delta: torch.Tensor | None = None
        for i, (decode, layer) in enumerate(zip(self.layers, model.model.layers)):
            if delta is not None:
                decode.delta.copy_(delta)
            self.run_layer(i, decode)
            delta = self.block_output(i, decode, layer.mlp, dtype)
        assert delta is not None
        return (self.layers[-1].r2 + delta).to(dtype)

    def logits(self, model: nn.Module, input_ids: torch.Tensor, start: int, kv: KVCache) -> torch.Tensor | None:
        """The token's logits [1, V] where the decoder also computes the final norm and lm_head (GgmlDecoder);
        None here: `hidden`, then the model's own head."""
        return None

    def block_output(self, index: int, decode: DecodeLayer, block: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
        """Layer `index`'s MLP block on its normed hidden state (and router logits): its output, the next
        layer's delta (None: the next layer's graph computes it itself, GgmlDecoder)."""
        n = decode.n if dtype == torch.float32 else decode.n.to(dtype)
        return block.from_logits(n, decode.logits) if decode.logits is not None else block(n)
