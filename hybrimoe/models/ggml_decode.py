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
Routing stays in torch (`MoEBlock.route_logits`: the family's rules, the observer). Where the previous
layer's block is its routed experts only, on the plain engine's executor over ggml's stacked experts
(`GgmlLayerExperts`), its experts and their weighted sum are the first ops of this layer's graph (its n,
ids and weights as inputs: MUL_MAT_ID, as llama.cpp computes them) instead of a call of their own:
one graph call per layer; the block's output then stays fp32 (the torch path rounds it to the model's
dtype). Otherwise (shared experts, dense MLPs, the hybrid runtime's executor, the last layer) the block
runs as OrtDecoder runs it and its output arrives as delta. Where every block allows it (plain softmax
top-k routers over routed experts only, hybrimoe.models.ggml_token), `hidden` runs the whole token as ONE
graph instead, routing included, and `logits` ends it with the final norm and a q4_0 lm_head.

The attended cache length is the position rounded up to KV_CHUNK (llama.cpp pads its KV view the same
way): one graph per layer and chunk count, built when first needed; masked positions are skipped by
flash attention's -inf test. Rotary: ggml_rope_ext in NEOX mode with base 1 and frequency factors
1 / inv_freq, so that angle i is position / (1 / inv_freq_i) (the model's own frequencies, YaRN's
included; our tables compute position * inv_freq_i: ~1 ulp apart) and cos/sin times YaRN's magnitude
scale. Numerics: the int4 matmuls round their input to Q8_0 per 32 (hybrimoe.moe.ggml_kernels); norms,
rotary, attention and the router are fp32 (ggml's rms_norm sums squares in double; its flash attention
accumulates in fp32 with an online softmax). Memory: ggml holds a
Q4_0 copy of q/k/v/o and of dense MLPs and shared experts (logged), next to the kernels' copies that prompts use; the KV cache is shared.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrimoe.models import ggml_kv
from hybrimoe.models.ggml_kv import KVMirror
from hybrimoe.models.ggml_layer import F32, BoundCache, DecodeInputs, GgmlLayer, build_layer, layer_graph
from hybrimoe.models.ggml_token import observe_token, token_experts, token_graph
from hybrimoe.models.kv_cache import KVCache
from hybrimoe.models.ort_decode import DecodeLayer, OrtDecoder
from hybrimoe.models.quant_linear import QuantLinear
from hybrimoe.moe.ggml_kernels import GgmlLayerExperts, GgmlMatmul
from hybrimoe.moe.ggml_lib import GGML_F16, GGML_F32, GGML_I32, Ggml, ggml_runtime
from hybrimoe.moe.layer import MoEBlock, ReferenceExecutor

log = logging.getLogger(__name__)

KV_CHUNK = 256  # tokens: the attended cache length is a multiple of this (one graph per multiple)


class GgmlDecoder(OrtDecoder):
    """OrtDecoder whose `run_layer` computes a layer's whole token (projections, attention, router) as one
    ggml graph; no onnxruntime session."""

    def __init__(self, model: nn.Module, lib: Ggml, ggml_layers: list[GgmlLayer], x: Any,
                 final_norm: tuple[Any, float], contexts: list[Any], buffers: list[Any]) -> None:
        layers = [DecodeLayer(None, None, *(torch.from_numpy(g.views[k]) for k in ("delta", "r2", "n")),
                              torch.from_numpy(g.views["logits"]) if "logits" in g.views else None)
                  for g in ggml_layers]
        hidden = ggml_layers[0].views["delta"].shape[1]
        super().__init__(model, layers, torch.from_numpy(lib.array(x, np.float32, (1, hidden))))
        self.lib, self.ggml_layers, self.x_tensor = lib, ggml_layers, x
        self.contexts, self.buffers = contexts, buffers
        self.shared: DecodeInputs | None = None
        self.bound: BoundCache | None = None
        self.graphs: list[Any] = []
        self.fused: tuple[GgmlLayerExperts | None, ...] = ()  # this token's `_fused`
        self.final_norm = final_norm  # the model's final RMSNorm: weight F32 [H, 1], eps
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
            got = build_layer(lib, layer, contexts, buffers)
            if isinstance(got, str):
                log.info("ggml decode graphs: not used (layer %d: %s)", i, got)
                lib.free(contexts, buffers)
                return None
            built.append(got[0])
            total += got[1]
        ctx = lib.context(2)
        contexts.append(ctx)
        hidden = built[0].views["delta"].shape[1]
        x, norm = (lib.ggml_new_tensor_2d(ctx, GGML_F32, hidden, 1) for _ in range(2))
        buffers.append(lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend))
        if not buffers[-1]:
            lib.free(contexts, buffers)
            raise MemoryError("ggml could not allocate the decoder's input")
        lib.array(norm, np.float32, (hidden,))[:] = model.model.norm.weight.detach().float().numpy()
        log.info("ggml decode graphs: %d layers, %.1f MB of q/k/v/o (and dense MLPs, shared experts) as Q4_0",
                 len(built), total / 1e6)
        return cls(model, lib, built, x, (norm, float(model.model.norm.eps)), contexts, buffers)

    def _bind_cache(self, kv: KVCache, end: int) -> BoundCache:
        """The ggml tensors over kv's buffers (and the mask for its length), made again for a new cache."""
        pairs = [kv[i].buffers(end, self.kv_heads, self.head_dim, self.head_dim, torch.float32,
                               torch.device("cpu")) for i in range(len(self.layers))]
        key = tuple(x for k, v in pairs for x in (k.data_ptr(), v.data_ptr(), k.shape[1]))
        if self.bound is not None and self.bound.key == key:
            return self.bound
        self._unbind()
        lib, capacity = self.lib, pairs[0][0].shape[1]
        bound = BoundCache(key, [], pairs)
        lib.owner(bound, bound.contexts, bound.buffers, bound.allocators)  # freed with it (or at once by _unbind)
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
        self.shared = DecodeInputs(position, mask, lib.array(position, np.int32, (1,)),
                                   lib.array(mask, np.float16, (capacity,)))
        self.bound = bound
        return bound

    def _add_mirror(self, bound: BoundCache, capacity: int) -> None:
        """The F16 copy of the bound cache (hybrimoe.models.ggml_kv), made when a token first attends to
        MATMUL_ATTENTION_FROM rows (short conversations never pay its memory); the graphs built so far do
        not write it, so they are built again."""
        bound.mirror = mirror = KVMirror.build(self.lib, bound.contexts, bound.buffers, len(bound.pairs),
                                               self.kv_heads, self.head_dim, capacity)
        bound.tensors = [(*t, k16, vt16, mirror.v_rows) for t, (k16, vt16) in zip(bound.tensors, mirror.tensors)]
        bound.graphs.clear()
        bound.token_graphs.clear()

    def _unbind(self) -> None:
        if self.bound is not None:
            self.lib.free(self.bound.contexts, self.bound.buffers, self.bound.allocators)
            self.bound = self.shared = None
            self.graphs = []

    def _fused(self, model: nn.Module) -> tuple[GgmlLayerExperts | None, ...]:
        """Per layer, its stacked experts where they run inside the next layer's graph: the plain engine's
        executor on ggml's stacked experts, no shared expert (checked per token: the hybrid runtime swaps
        executors); else None."""
        blocks = [layer.mlp for layer in model.model.layers]
        return tuple(b.executor.store.layer_kernel(b.layer_idx)
                     if i + 1 < len(blocks) and isinstance(b, MoEBlock) and b.routed_only()
                     and type(b.executor) is ReferenceExecutor else None for i, b in enumerate(blocks))

    def block_output(self, index: int, decode: DecodeLayer, block: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
        """Where `_fused`: the block's routing only (and its observer), its experts in layer index + 1's graph."""
        if self.fused[index] is None:
            return super().block_output(index, decode, block, dtype)
        ids, weights = block.route_logits(decode.logits)
        expert_ids, expert_weights = ids.numpy().reshape(-1), weights.float().numpy().reshape(-1)
        order = np.argsort(expert_ids)  # ascending expert: the torch path's summation order
        views = self.ggml_layers[index].views
        views["ids"][...] = expert_ids[order]  # (numpy: 9 against 57 us of torch ops per layer)
        views["weights"][...] = expert_weights[order]
        return None

    def _inputs(self, kv: KVCache, end: int) -> tuple[BoundCache, int, int]:
        """This token's shared inputs (position end - 1, the mask) over the bound cache: (the bound cache,
        the attended length, the cache's capacity)."""
        bound = self._bind_cache(kv, end)
        shared = self.shared
        assert shared is not None
        capacity = int(shared.mask_view.shape[0])
        shared.position_view[0] = end - 1
        length = min(-(-end // KV_CHUNK) * KV_CHUNK, capacity)
        window = self.ggml_layers[0].attn.sliding_window
        shared.mask_view[:length] = -np.inf
        shared.mask_view[max(0, end - window) if window else 0:end] = 0  # attended: pos - j < window
        if bound.mirror is None and length >= ggml_kv.MATMUL_ATTENTION_FROM:
            self._add_mirror(bound, capacity)
        if bound.mirror is not None:
            bound.mirror.sync(bound.pairs, kv, end - 1)
        return bound, length, capacity

    def _written(self, end: int) -> None:
        """The token's graphs ran: the F16 copy holds every row below `end`."""
        if self.bound is not None and self.bound.mirror is not None:
            self.bound.mirror.synced = end

    def _prepare(self, model: nn.Module, kv: KVCache, end: int) -> None:
        """This token's inputs (`_inputs`), the fusion pattern and the graphs."""
        self.fused = fused = self._fused(model)
        bound, length, capacity = self._inputs(kv, end)
        key = (length, tuple(id(f) for f in fused))
        if key not in bound.graphs:
            layers = self.ggml_layers
            inputs = [self.x_tensor] + [g.io["r2"] for g in layers[:-1]]  # layer l reads l - 1's r2
            previous = [None] + [(f, g) if f is not None else None for f, g in zip(fused[:-1], layers[:-1])]
            bound.graphs[key] = [layer_graph(self.lib, g, x, kvt, self.shared, length, capacity, bound, p)
                                 for g, x, kvt, p in zip(layers, inputs, bound.tensors, previous)]
            bound.keep.extend(f for f in fused if f is not None)  # (keyed by id: none may be collected)
        self.graphs = bound.graphs[key]

    def _compute(self, graph: Any) -> None:
        with self.lib.lock:
            if self.lib.ggml_backend_graph_compute(self.lib.backend, graph) != 0:
                raise RuntimeError("ggml graph compute failed")

    def run_layer(self, index: int, decode: DecodeLayer) -> None:
        self._compute(self.graphs[index])

    def hidden(self, model: nn.Module, input_ids: torch.Tensor, start: int, kv: KVCache) -> torch.Tensor:
        """As OrtDecoder.hidden; where `token_experts` allows, the whole token is one graph (ggml_token)."""
        out = self._token(model, input_ids, start, kv, None)
        if out is None:
            out = super().hidden(model, input_ids, start, kv)
            self._written(start + 1)
        return out

    def logits(self, model: nn.Module, input_ids: torch.Tensor, start: int, kv: KVCache) -> torch.Tensor | None:
        """The token's logits [1, V] fp32 from one graph that also computes the final norm and lm_head, where
        `token_experts` allows and lm_head runs on ggml (`--lm-head-dtype q4_0`); else None (nothing done)."""
        head = model.lm_head.ort if isinstance(model.lm_head, QuantLinear) else None
        if not isinstance(head, GgmlMatmul):
            return None
        return self._token(model, input_ids, start, kv, head.weight)

    def _token(self, model: nn.Module, input_ids: torch.Tensor, start: int, kv: KVCache,
               head: Any) -> torch.Tensor | None:
        """One token through the whole-token graph: its hidden state [1, H] in the model's dtype, or with
        `head` (lm_head's Q4_0 weight) its logits [1, V] fp32; None where `token_experts` refuses."""
        experts = token_experts(model, self.ggml_layers)
        if experts is None:
            return None
        bound, length, capacity = self._inputs(kv, start + 1)
        key = (length, tuple(id(e) for e in experts if e is not None), head)
        if key not in bound.token_graphs:
            assert self.shared is not None
            blocks = [layer.mlp for layer in model.model.layers]
            final = None if head is None else (*self.final_norm, head)
            bound.token_graphs[key] = token_graph(self.lib, self.ggml_layers, blocks, experts, self.x_tensor,
                                                  bound.tensors, self.shared, length, capacity, bound, final)
            bound.keep.extend(e for e in experts if e is not None)  # (keyed by id: none may be collected)
        token = bound.token_graphs[key]
        self.x.copy_(model.model.embed_tokens(input_ids))
        self._compute(token.graph)
        self._written(start + 1)
        observe_token(token)
        return torch.from_numpy(token.out).to(torch.float32 if head is not None else model.dtype, copy=True)
