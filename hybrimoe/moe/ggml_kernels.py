"""CPU int4 experts on llama.cpp's own kernels (`--cpu-kernel ggml`; hybrimoe.moe.ggml_lib loads ggml).

    ggml_blocks(Int4View) -> GgmlBlocks | None   the matrix as ggml Q4_0 (symmetric) or Q4_1 blocks
    GgmlExpert.build(QuantExpert)                one expert: down @ swiglu(gate_up @ x), [T, H] -> [T, H]

Blocks (ggml-common.h): 32 weights each; Q4_0 = fp16 d + 16 bytes, w = (q - 8) * d; Q4_1 = fp16 d, fp16 m
+ 16 bytes, w = q * d + m; byte j holds weight j (low nibble) and weight j + 16 (high nibble). Our int4
(w = (q - 8) * scale + zero per group of 32/64/128/256) maps onto them exactly but for fp16: a group of 64+
becomes 2+ blocks with its scale; a store whose zeros are all 0 (`--int4-scheme q4_0`, GGUF Q4_0) becomes Q4_0
with d = fp16(scale) (exact for bf16 scales in fp16's normal range), any other becomes Q4_1 with
d = fp16(scale), m = fp16(zero - 8 * scale). Q4_0 goes to the CPU_REPACK buffer, where llama.cpp keeps its
own Q4_0 weights (the q4_0_8x8 GEMV: measured 269 us for a [8192, 2048] matrix at one token on the 2-vCPU
Zen 4, 35 GB/s, against 541 us for plain Q4_0, 600 us for Q4_1 and 750-800 us for onnxruntime's MatMulNBits
at group 32: benchmarks/RESULTS_formats.md). Q4_1 has no repacked kernel and stays in a plain CPU buffer.

Numerics: ggml quantises the activations to Q8_0 (Q8_1 for Q4_1) per block of 32 (d = max|x| / 127 in fp16,
round to nearest), multiplies in integers and sums the blocks in fp32; the swiglu between the two matmuls
is fp32. tests/test_ggml_kernels.py re-implements this in plain torch and compares.

Memory: ggml holds its own copy (18 or 20 bytes per 32 weights: 0.90x or 1.0x a group-32 int4 store in
bf16); a CPU-only engine frees the store's bytes layer by layer as the copies are made.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hybrimoe.moe.ggml_lib import BUFFER_USAGE_WEIGHTS, GGML_F32, GGML_Q4_0, GGML_Q4_1, Ggml, ggml_runtime
from hybrimoe.moe.kernels import Int4View, QuantExpert

BLOCK = 32  # weights per ggml Q4 block
REPACK_ROWS = 8  # q4_0_8x8 interleaves 8 rows: Q4_0 matrices with a row count divisible by it are repacked
GGML_MEMORY_FACTOR = {GGML_Q4_0: 18 / 20, GGML_Q4_1: 1.0}  # ggml's bytes / a group-32 bf16 int4 store's


@dataclass(frozen=True)
class GgmlBlocks:
    """One [N, K] matrix as ggml blocks (plain numpy, copied into ggml's buffer at build)."""
    type: int  # GGML_Q4_0 | GGML_Q4_1
    data: np.ndarray  # uint8 [N, K/32, 18 | 20]
    n: int
    k: int


def ggml_blocks(view: Int4View) -> GgmlBlocks | None:
    """`view` (host or device) as ggml blocks; None when its group is not a multiple of 32."""
    n, k, g = view.n, view.k, view.group
    if g % BLOCK or k % g:
        return None
    per = g // BLOCK
    scale = view.sz[..., 0].t().float().cpu().repeat_interleave(per, dim=1)  # [N, K/32]
    zero = view.sz[..., 1].t().float().cpu().repeat_interleave(per, dim=1)
    codes = view.layout.unpack(view.packed.cpu(), n, k).view(n, k // BLOCK, 2, BLOCK // 2)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 4)  # [N, K/32, 16]: weight j low, weight j + 16 high

    def half(t: torch.Tensor) -> torch.Tensor:  # [N, K/32] fp32 -> [N, K/32, 2] bytes of fp16
        return t.to(torch.float16).contiguous().view(torch.uint8).view(n, k // BLOCK, 2)

    if bool((zero == 0).all()):
        return GgmlBlocks(GGML_Q4_0, torch.cat((half(scale), qs), dim=2).numpy(), n, k)
    return GgmlBlocks(GGML_Q4_1, torch.cat((half(scale), half(zero - 8.0 * scale), qs), dim=2).numpy(), n, k)


@dataclass
class _Graph:
    """One expert's graph for a fixed token count: x [H, T] -> y [H, T] (ggml order: ne0 first)."""
    ctx: Any
    graph: Any
    x: np.ndarray  # fp32 [T, H] view of ggml's input tensor
    y: np.ndarray  # fp32 [T, H] view of ggml's output tensor
    buffer: Any = None  # the activations' buffer when the graph owns one


@dataclass
class GgmlExpert:
    """f(x) = down @ (silu(gate @ x) * (up @ x)) on ggml's CPU kernels, gate_up [2I, H], down [H, I]."""
    lib: Ggml
    ctx: Any  # the weights' tensor metadata
    buffer: Any  # the weights' ggml buffer (CPU_REPACK for Q4_0)
    gate_up: Any  # ggml tensor [ne0=H, ne1=2I]
    down: Any  # ggml tensor [ne0=I, ne1=H]
    hidden: int
    intermediate: int
    nbytes: int  # the bytes handed to ggml
    types: tuple[int, int]
    _decode: _Graph | None = field(default=None, repr=False)  # the cached one-token graph

    @classmethod
    def build(cls, expert: QuantExpert) -> GgmlExpert | None:
        """None when a matrix is not int4 with a group that is a multiple of 32 (it stays on torch's kernel)."""
        if not isinstance(expert.gate_up, Int4View) or not isinstance(expert.down, Int4View):
            return None
        a, b = ggml_blocks(expert.gate_up), ggml_blocks(expert.down)
        if a is None or b is None:
            return None
        lib = ggml_runtime()
        ctx = lib.context(2)
        gate_up = lib.ggml_new_tensor_2d(ctx, a.type, a.k, a.n)
        down = lib.ggml_new_tensor_2d(ctx, b.type, b.k, b.n)
        repack = (lib.repack_buffer_type is not None and a.type == b.type == GGML_Q4_0
                  and a.n % REPACK_ROWS == 0 and b.n % REPACK_ROWS == 0)
        buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, lib.repack_buffer_type if repack
                                                              else lib.cpu_buffer_type)
        if not buffer:
            lib.ggml_free(ctx)
            raise MemoryError(f"ggml could not allocate an expert's {a.data.nbytes + b.data.nbytes} bytes")
        lib.ggml_backend_buffer_set_usage(buffer, BUFFER_USAGE_WEIGHTS)
        for tensor, blocks in ((gate_up, a), (down, b)):
            assert lib.ggml_nbytes(tensor) == blocks.data.nbytes
            lib.ggml_backend_tensor_set(tensor, blocks.data.ctypes.data, 0, blocks.data.nbytes)  # repacks
        return cls(lib, ctx, buffer, gate_up, down, a.k, expert.intermediate, a.data.nbytes + b.data.nbytes,
                   (a.type, b.type))

    def _graph(self, tokens: int) -> _Graph:
        lib = self.lib
        ctx = lib.context(4, graph_nodes=8)
        x = lib.ggml_new_tensor_2d(ctx, GGML_F32, self.hidden, tokens)
        h = lib.ggml_mul_mat(ctx, self.gate_up, x)  # [2I, T]
        act = lib.ggml_swiglu(ctx, h)  # silu(first half) * second half: [I, T]
        y = lib.ggml_mul_mat(ctx, self.down, act)  # [H, T]
        graph = lib.ggml_new_graph_custom(ctx, 8, False)
        lib.ggml_build_forward_expand(graph, y)
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend)
        if not buffer:
            lib.ggml_free(ctx)
            raise MemoryError("ggml could not allocate an expert's activations")

        def array(tensor: Any) -> np.ndarray:
            return np.ctypeslib.as_array(C.cast(lib.ggml_get_data(tensor), C.POINTER(C.c_float)),
                                         (tokens, self.hidden))

        return _Graph(ctx, graph, array(x), array(y), buffer)

    def _free(self, graph: _Graph) -> None:
        self.lib.ggml_backend_buffer_free(graph.buffer)
        self.lib.ggml_free(graph.ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (any float dtype, CPU) -> [T, H] in x's dtype."""
        tokens = x.shape[0]
        with self.lib.lock:
            if tokens == 1:
                if self._decode is None:
                    self._decode = self._graph(1)
                graph = self._decode
            else:
                graph = self._graph(tokens)
            try:
                graph.x[...] = x.detach().to(torch.float32).numpy()
                status = self.lib.ggml_backend_graph_compute(self.lib.backend, graph.graph)
                if status != 0:
                    raise RuntimeError(f"ggml graph compute failed (status {status})")
                y = torch.from_numpy(graph.y.copy())
            finally:
                if graph is not self._decode:
                    self._free(graph)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def close(self) -> None:
        """Frees ggml's memory of this expert (its weights and cached graph)."""
        if self._decode is not None:
            self._free(self._decode)
            self._decode = None
        if self.buffer:
            self.lib.ggml_backend_buffer_free(self.buffer)
            self.lib.ggml_free(self.ctx)
            self.buffer = None
