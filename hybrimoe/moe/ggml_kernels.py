"""CPU int4 experts on llama.cpp's own kernels (`--cpu-kernel ggml`; hybrimoe.moe.ggml_lib loads ggml).

    q4_0_blocks(Int4View) -> np.ndarray | None   the matrix as ggml Q4_0 blocks (None: not symmetric int4)
    GgmlExpert.build(QuantExpert)                one expert: down @ swiglu(gate_up @ x), [T, H] -> [T, H]
    GgmlMatmul.build(Int4View)                   one linear (a q4_0 dense weight): x @ W^T, [T, K] -> [T, N]
    GgmlLayerExperts.build([QuantExpert])        a layer's experts stacked; .combine(x, ids, weights): a decode
                                                 token's routed experts and their weighted sum in one graph

Q4_0 (ggml-common.h): blocks of 32 weights, fp16 d + 16 bytes, w = (q - 8) * d, byte j holding weight j
(low nibble) and weight j + 16 (high nibble). Symmetric int4 (`--expert-dtype q4_0`, or a GGUF's Q4_0:
every stored zero is 0) is exactly that with d = fp16(scale) (exact for bf16 scales in fp16's normal range;
a group of 64+ becomes 2+ blocks with its scale). The blocks go to the CPU_REPACK buffer, where llama.cpp
keeps its own Q4_0 weights (the q4_0_8x8 kernels). Measured on the 2-vCPU Zen 4 (benchmarks/RESULTS_formats.md):
a [8192, 2048] matrix at one token 269 us (35 GB/s) against 541 us for plain Q4_0 and 750-800 us for
onnxruntime's MatMulNBits at group 32; a Mixtral expert 3.1 ms at one token, 166 ms at 128.
Asymmetric int4 (our default quantiser, GGUF Q4_K) would be ggml's Q4_1, which has no repacked kernel
and measured slower than torch's own int4 kernel (7.9 against 5.2 ms for the Mixtral expert at one token):
those experts stay on torch's kernel.

Numerics: ggml quantises the activations to Q8_0 per block of 32 (d = max|x| / 127 in fp16, round to
nearest), multiplies in integers and sums the blocks in fp32; the swiglu between the two matmuls is fp32.
tests/test_ggml_kernels.py re-implements this in plain torch and compares.

Memory: ggml holds its own copy (18 bytes per 32 weights: 0.9x a group-32 int4 store in bf16); a CPU-only
engine frees the store's bytes layer by layer as the copies are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hybrimoe.moe.ggml_lib import BUFFER_USAGE_WEIGHTS, GGML_F32, GGML_I32, GGML_Q4_0, Ggml, ggml_runtime
from hybrimoe.moe.kernels import Int4View, QuantExpert

BLOCK = 32  # weights per ggml Q4 block
REPACK_ROWS = 8  # q4_0_8x8 interleaves 8 rows: Q4_0 matrices with a row count divisible by it are repacked


def q4_0_blocks(view: Int4View) -> np.ndarray | None:
    """`view` (host or device) as ggml Q4_0 blocks, uint8 [N, K/32, 18]; None unless every zero is 0
    (symmetric int4) and the group is a multiple of 32."""
    n, k, g = view.n, view.k, view.group
    if g % BLOCK or k % g:
        return None
    zero = view.sz[..., 1]
    if bool((zero != 0).any()):
        return None
    scale = view.sz[..., 0].t().float().cpu().repeat_interleave(g // BLOCK, dim=1)  # [N, K/32]
    codes = view.layout.unpack(view.packed.cpu(), n, k).view(n, k // BLOCK, 2, BLOCK // 2)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 4)  # [N, K/32, 16]: weight j low, weight j + 16 high
    d = scale.to(torch.float16).contiguous().view(torch.uint8).view(n, k // BLOCK, 2)
    return torch.cat((d, qs), dim=2).numpy()


@dataclass
class _Graph:
    """A kernel's graph for a fixed token count: x [K, T] -> y [N, T] (ggml order: ne0 first)."""
    ctx: Any
    graph: Any
    x: np.ndarray  # fp32 [T, K] view of ggml's input tensor
    y: np.ndarray  # fp32 [T, N] view of ggml's output tensor
    buffer: Any = None  # the activations' buffer


def q4_0_weights(lib: Ggml, mats: list[tuple[np.ndarray, tuple[int, ...]]], what: str) -> tuple[Any, Any, list[Any]]:
    """Q4_0 weights (blocks, ggml shape (K, N) or (K, N, E): row length first) in one ggml buffer (CPU_REPACK
    when every N is a multiple of REPACK_ROWS): (context, buffer, tensors); freed with `lib.owner` by the
    caller."""
    ctx = lib.context(len(mats))
    tensors = [lib.ggml_new_tensor_2d(ctx, GGML_Q4_0, *shape) if len(shape) == 2
               else lib.ggml_new_tensor_3d(ctx, GGML_Q4_0, *shape) for _, shape in mats]
    repack = lib.repack_buffer_type is not None and all(shape[1] % REPACK_ROWS == 0 for _, shape in mats)
    buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, lib.repack_buffer_type if repack else lib.cpu_buffer_type)
    if not buffer:
        lib.ggml_free(ctx)
        raise MemoryError(f"ggml could not allocate {what}'s {sum(b.nbytes for b, _ in mats)} bytes")
    lib.ggml_backend_buffer_set_usage(buffer, BUFFER_USAGE_WEIGHTS)
    for tensor, (blocks, _) in zip(tensors, mats):
        assert lib.ggml_nbytes(tensor) == blocks.nbytes
        lib.ggml_backend_tensor_set(tensor, blocks.ctypes.data, 0, blocks.nbytes)  # repacks
    return ctx, buffer, tensors


class _GgmlKernel:
    """Runs `_output(ctx, x)` [N, T] from x [K, T] as a ggml graph: the one-token graph is built once and
    kept, other token counts get a graph per call. Needs `lib`, `in_features`, `out_features`, `_decode`."""
    lib: Ggml
    in_features: int
    out_features: int
    _decode: _Graph | None

    def _output(self, ctx: Any, x: Any) -> Any:
        raise NotImplementedError

    def _graph(self, tokens: int) -> _Graph:
        lib = self.lib
        ctx = lib.context(4, graph_nodes=8)
        x = lib.ggml_new_tensor_2d(ctx, GGML_F32, self.in_features, tokens)
        y = self._output(ctx, x)
        graph = lib.ggml_new_graph_custom(ctx, 8, False)
        lib.ggml_build_forward_expand(graph, y)
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend)
        if not buffer:
            lib.ggml_free(ctx)
            raise MemoryError("ggml could not allocate a kernel's activations")

        return _Graph(ctx, graph, lib.array(x, np.float32, (tokens, self.in_features)),
                      lib.array(y, np.float32, (tokens, self.out_features)), buffer)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] (any float dtype, CPU) -> [T, N] in x's dtype."""
        tokens = x.shape[0]
        lib = self.lib
        with lib.lock:
            if tokens == 1:
                if self._decode is None:
                    self._decode = self._graph(1)
                    lib.owner(self, [self._decode.ctx], [self._decode.buffer])
                graph = self._decode
            else:
                graph = self._graph(tokens)
            try:
                graph.x[...] = x.detach().to(torch.float32).numpy()
                status = lib.ggml_backend_graph_compute(lib.backend, graph.graph)
                if status != 0:
                    raise RuntimeError(f"ggml graph compute failed (status {status})")
                y = torch.from_numpy(graph.y.copy())
            finally:
                if graph is not self._decode:
                    lib.ggml_backend_buffer_free(graph.buffer)
                    lib.ggml_free(graph.ctx)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


@dataclass
class GgmlExpert(_GgmlKernel):
    """f(x) = down @ (silu(gate @ x) * (up @ x)) on ggml's CPU kernels, gate_up [2I, H], down [H, I]."""
    lib: Ggml
    ctx: Any  # the weights' tensor metadata
    buffer: Any  # the weights' ggml buffer (CPU_REPACK for Q4_0); None for views into a GgmlLayerExperts
    gate_up: Any  # ggml tensor [ne0=H, ne1=2I]
    down: Any  # ggml tensor [ne0=I, ne1=H]
    hidden: int
    intermediate: int
    nbytes: int  # the Q4_0 bytes handed to ggml
    _decode: _Graph | None = field(default=None, repr=False)  # the cached one-token graph
    parent: Any = field(default=None, repr=False)  # the GgmlLayerExperts whose memory the views read

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.hidden

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.hidden

    @classmethod
    def build(cls, expert: QuantExpert) -> GgmlExpert | None:
        """None unless both matrices are symmetric int4 with a group that is a multiple of 32 (the expert
        then stays on torch's kernel)."""
        if not isinstance(expert.gate_up, Int4View) or not isinstance(expert.down, Int4View):
            return None
        a, b = q4_0_blocks(expert.gate_up), q4_0_blocks(expert.down)
        if a is None or b is None:
            return None
        lib = ggml_runtime()
        ctx, buffer, (gate_up, down) = q4_0_weights(lib, [(a, (expert.gate_up.k, expert.gate_up.n)),
                                                          (b, (expert.down.k, expert.down.n))], "an expert")
        built = cls(lib, ctx, buffer, gate_up, down, expert.gate_up.k, expert.intermediate, a.nbytes + b.nbytes)
        lib.owner(built, [ctx], [buffer])  # freed with the expert
        return built

    def _output(self, ctx: Any, x: Any) -> Any:
        h = self.lib.ggml_mul_mat(ctx, self.gate_up, x)  # [2I, T]
        act = self.lib.ggml_swiglu(ctx, h)  # silu(first half) * second half: [I, T]
        return self.lib.ggml_mul_mat(ctx, self.down, act)  # [H, T]

    @classmethod
    def view_of(cls, layer: GgmlLayerExperts, e: int) -> GgmlExpert:
        """Expert `e` of a stacked layer, as 2-D views of its slices (the repacked layout keeps each
        expert's rows at the plain layout's offsets: whole groups of 8 rows)."""
        lib, h, i = layer.lib, layer.hidden, layer.intermediate
        ctx = lib.context(2)
        row_h, row_i = lib.ggml_row_size(GGML_Q4_0, h), lib.ggml_row_size(GGML_Q4_0, i)
        gate_up = lib.ggml_view_2d(ctx, layer.gate_up, h, 2 * i, row_h, e * 2 * i * row_h)
        down = lib.ggml_view_2d(ctx, layer.down, i, h, row_i, e * h * row_i)
        for view in (gate_up, down):
            if lib.ggml_backend_view_init(view) != 0:
                lib.ggml_free(ctx)
                raise RuntimeError("ggml could not view an expert of a stacked layer")
        expert = cls(lib, ctx, None, gate_up, down, h, i, layer.nbytes // layer.experts, parent=layer)
        lib.owner(expert, [ctx], [])
        return expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (any float dtype, CPU) -> [T, H] in x's dtype."""
        return self._run(x)


@dataclass
class _Combine:
    """A layer's one-token graph of k routed experts: x [H], ids [k], weights [k] -> y [H]."""
    ctx: Any
    buffer: Any
    graph: Any
    x: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    y: np.ndarray


@dataclass
class GgmlLayerExperts:
    """One MoE layer's experts stacked as llama.cpp keeps them (gate_up [E, 2I, H], down [E, H, I], Q4_0,
    repacked): `experts[e]` computes one (views), `combine` a decode token's k routed experts and their
    weighted sum in ONE graph (MUL_MAT_ID), instead of k graph calls and a torch sum."""
    lib: Ggml
    ctx: Any
    buffer: Any
    gate_up: Any  # [ne0=H, ne1=2I, ne2=E]
    down: Any  # [ne0=I, ne1=H, ne2=E]
    hidden: int
    intermediate: int
    experts: int
    nbytes: int  # the Q4_0 bytes handed to ggml
    views: list[GgmlExpert] = field(default_factory=list, repr=False)
    _graphs: dict[int, _Combine] = field(default_factory=dict, repr=False)  # k -> its graph

    @classmethod
    def build(cls, views: list[QuantExpert]) -> GgmlLayerExperts | None:
        """None unless every expert is symmetric int4 with a group that is a multiple of 32 and the rows fit
        the repacked kernels (then the experts are built one by one)."""
        first = views[0]
        if not all(isinstance(v.gate_up, Int4View) and isinstance(v.down, Int4View) for v in views):
            return None
        lib = ggml_runtime()
        h, i, n = first.gate_up.k, first.intermediate, len(views)
        if lib.repack_buffer_type is None or (2 * i) % REPACK_ROWS or h % REPACK_ROWS:
            return None
        a = np.empty((n, 2 * i, h // BLOCK, 18), np.uint8)
        b = np.empty((n, h, i // BLOCK, 18), np.uint8)
        for e, v in enumerate(views):
            blocks = q4_0_blocks(v.gate_up), q4_0_blocks(v.down)
            if blocks[0] is None or blocks[1] is None:
                return None
            a[e], b[e] = blocks
        ctx, buffer, (gate_up, down) = q4_0_weights(lib, [(a, (h, 2 * i, n)), (b, (i, h, n))], "a layer's experts")
        built = cls(lib, ctx, buffer, gate_up, down, h, i, n, a.nbytes + b.nbytes)
        lib.owner(built, [ctx], [buffer])
        built.views = [GgmlExpert.view_of(built, e) for e in range(n)]
        return built

    def combine_ops(self, ctx: Any, x: Any, ids: Any, weights: Any, k: int) -> Any:
        """The ops of `combine` in `ctx` (also inside a decoder layer's graph, hybrimoe.models.ggml_decode):
        x F32 [H, 1, 1], ids I32 [k, 1], weights F32 [1, k, 1] -> y F32 [H, 1], summed in slot order."""
        lib, h = self.lib, self.hidden
        act = lib.ggml_swiglu(ctx, lib.ggml_mul_mat_id(ctx, self.gate_up, x, ids))  # [I, k, 1]
        ys = lib.ggml_mul(ctx, lib.ggml_mul_mat_id(ctx, self.down, act, ids), weights)  # [H, k, 1], weighted
        row = h * 4
        y = lib.ggml_view_2d(ctx, ys, h, 1, row, 0)
        for j in range(1, k):  # in slot order (`combine` and the per-layer graphs sort them by expert, as the torch
            #                    path sums; the whole-token graph keeps the router's order, highest score first)
            y = lib.ggml_add(ctx, y, lib.ggml_view_2d(ctx, ys, h, 1, row, j * row))
        return y

    def _graph(self, k: int) -> _Combine:
        lib, h = self.lib, self.hidden
        ctx = lib.context(16 + 2 * k, graph_nodes=16 + 2 * k)
        x = lib.ggml_new_tensor_3d(ctx, GGML_F32, h, 1, 1)
        ids = lib.ggml_new_tensor_2d(ctx, GGML_I32, k, 1)
        w = lib.ggml_new_tensor_3d(ctx, GGML_F32, 1, k, 1)
        y = self.combine_ops(ctx, x, ids, w, k)
        graph = lib.ggml_new_graph_custom(ctx, 16 + 2 * k, False)
        lib.ggml_build_forward_expand(graph, y)
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend)
        if not buffer:
            lib.ggml_free(ctx)
            raise MemoryError("ggml could not allocate a layer's expert activations")
        lib.owner(self, [ctx], [buffer])

        return _Combine(ctx, buffer, graph, lib.array(x, np.float32, (h,)), lib.array(ids, np.int32, (k,)),
                        lib.array(w, np.float32, (k,)), lib.array(y, np.float32, (1, h)))

    def combine(self, x: torch.Tensor, ids: list[int], weights: torch.Tensor) -> torch.Tensor:
        """x [1, H] (CPU), the token's routed experts `ids` [k] and their weights [k] -> sum_j w_j f_j(x),
        [1, H] in x's dtype (summed in fp32 in ascending expert order)."""
        order = sorted(range(len(ids)), key=ids.__getitem__)
        with self.lib.lock:
            g = self._graphs.get(len(ids))
            if g is None:
                g = self._graphs[len(ids)] = self._graph(len(ids))
            g.x[...] = x.detach().reshape(-1).to(torch.float32).numpy()
            g.ids[...] = [ids[j] for j in order]
            g.weights[...] = weights.detach().reshape(-1)[order].to(torch.float32).numpy()
            if self.lib.ggml_backend_graph_compute(self.lib.backend, g.graph) != 0:
                raise RuntimeError("ggml graph compute failed")
            y = torch.from_numpy(g.y.copy())
        return y if x.dtype == torch.float32 else y.to(x.dtype)


@dataclass
class GgmlMatmul(_GgmlKernel):
    """y = x @ W^T for a symmetric int4 W [N, K] on ggml's Q4_0 kernel (`QuantLinear.use_ggml`)."""
    lib: Ggml
    ctx: Any
    buffer: Any
    weight: Any  # ggml tensor [ne0=K, ne1=N]
    in_features: int
    out_features: int
    nbytes: int  # the Q4_0 bytes handed to ggml
    _decode: _Graph | None = field(default=None, repr=False)

    @classmethod
    def build(cls, view: Int4View) -> GgmlMatmul | None:
        """None unless `view` is symmetric int4 with a group that is a multiple of 32."""
        blocks = q4_0_blocks(view)
        if blocks is None:
            return None
        lib = ggml_runtime()
        ctx, buffer, (weight,) = q4_0_weights(lib, [(blocks, (view.k, view.n))], "a linear")
        built = cls(lib, ctx, buffer, weight, view.k, view.n, blocks.nbytes)
        lib.owner(built, [ctx], [buffer])
        return built

    def _output(self, ctx: Any, x: Any) -> Any:
        return self.lib.ggml_mul_mat(ctx, self.weight, x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] (CPU) -> [T, N] in x's dtype."""
        return self._run(x)
