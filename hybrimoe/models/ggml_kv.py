"""Attention of one decode token in the ggml graphs, and the F16 copy of the KV cache it reads at long contexts.

    KVMirror.build(lib, contexts, buffers, layers, kv_heads, head_dim, capacity)   F16 K and V^T per layer
    mirror.sync(pairs, kv, position)    rows the torch path wrote since, copied in (numpy) before a graph runs
    attend(lib, ctx, q, k, v, heads, cache, shared, length, capacity, scale, writes) -> out [D, Hq] F32

Up to MATMUL_ATTENTION_FROM attended rows the graph runs `ggml_flash_attn_ext` over our fp32 cache. From
there on it reads the mirror as llama.cpp reads its own cache with flash attention off (its default in
llama-cpp-python): kq = K16 q (one matmul, GQA broadcast), softmax with the mask, out = V^T16 kq. On the
2-vCPU Zen 3 a whole token went from 20.4 to 19.6 ms at 1024 cached tokens and from 27.3 to 24.4 at 3000
(benchmarks/RESULTS_formats.md); a transposed V cannot be made per token (a ggml_cont of it: 11 ms), so it is
kept: every graph writes the token's k/v into both (ggml_set_rows; V^T element-wise at rows
(h * D + d) * S + position), and rows the torch path wrote (prompts) are copied in before the next graph
(`KVCache.written_from`). Memory: half the fp32 cache again (logged), made when a token first attends to
MATMUL_ATTENTION_FROM rows. Numerics: K and V rounded to F16 and
the attention weights to F16 in the second matmul, as llama.cpp's default cache does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hybrimoe.moe.ggml_lib import GGML_F16, GGML_I32, Ggml

log = logging.getLogger(__name__)

MATMUL_ATTENTION_FROM = 512  # attended rows from which the graphs read the F16 mirror with two matmuls
F16 = 2  # bytes


@dataclass
class KVMirror:
    """Per layer F16 K [D, S, Hkv] and V^T [S, D, Hkv] (ggml order) over one bound cache; `synced`: rows
    below it equal the fp32 cache's."""
    tensors: list[tuple[Any, Any]]
    halves: list[tuple[torch.Tensor, torch.Tensor]]  # torch views: fp16 [Hkv, S, D] and [Hkv, D, S]
    v_rows: Any  # I32 [D * Hkv]: where the token's v values go in V^T seen as S * D * Hkv rows of one
    v_rows_view: np.ndarray
    v_base: np.ndarray  # int32 [D * Hkv]: (h * D + d) * S
    synced: int = 0

    @classmethod
    def build(cls, lib: Ggml, contexts: list[Any], buffers: list[Any], layers: int, kv_heads: int, head_dim: int,
              capacity: int) -> KVMirror:
        ctx = lib.context(2 * layers + 1)
        contexts.append(ctx)
        tensors = [(lib.ggml_new_tensor_3d(ctx, GGML_F16, head_dim, capacity, kv_heads),
                    lib.ggml_new_tensor_3d(ctx, GGML_F16, capacity, head_dim, kv_heads)) for _ in range(layers)]
        v_rows = lib.ggml_new_tensor_1d(ctx, GGML_I32, head_dim * kv_heads)
        buffers.append(lib.ggml_backend_alloc_ctx_tensors(ctx, lib.backend))
        if not buffers[-1]:
            raise MemoryError("ggml could not allocate the F16 copy of the KV cache")

        halves = [(torch.from_numpy(lib.array(k, np.float16, (kv_heads, capacity, head_dim))),
                   torch.from_numpy(lib.array(vt, np.float16, (kv_heads, head_dim, capacity)))) for k, vt in tensors]
        for k16, vt16 in halves:  # the matmuls read masked rows too (0 * garbage could be NaN): zeros, as llama.cpp
            k16.zero_()
            vt16.zero_()
        log.info("ggml decode graphs: an F16 copy of the KV cache, %.1f MB",
                 2 * layers * kv_heads * head_dim * capacity * F16 / 1e6)
        return cls(tensors, halves, v_rows, lib.array(v_rows, np.int32, (head_dim * kv_heads,)),
                   np.arange(head_dim * kv_heads, dtype=np.int32) * capacity)

    def sync(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], kv: Any, position: int) -> None:
        """Before a graph writes `position`: rows [synced, position) copied from the fp32 cache `pairs`
        (k, v [Hkv, S, D] per layer), after lowering `synced` to what the torch path wrote since."""
        self.synced = min(self.synced, kv.written_from)
        kv.written_from = kv.max_tokens
        start = self.synced
        if start < position:  # (torch's fp16 conversion: 3000 rows of 8 layers in ~10 against 150 ms with numpy)
            for (k, v), (k16, vt16) in zip(pairs, self.halves):
                k16[:, start:position].copy_(k[:, start:position])
                vt16[:, :, start:position].copy_(v[:, start:position].transpose(1, 2))
        self.v_rows_view[...] = self.v_base + position
        self.synced = position  # position + 1 once the graph wrote it (the decoder says so)


def attend(lib: Ggml, ctx: Any, q: Any, k: Any, v: Any, heads: tuple[int, int, int], cache: tuple[Any, ...],
           shared: Any, length: int, capacity: int, scale: float, writes: list[Any]) -> Any:
    """One query's attention in `ctx`: q [D, Hq], k and v [D, Hkv] (rotated, F32; heads = (Hq, Hkv, D)) written
    at the position into the fp32 cache (cache[:2], k and v [D, S, Hkv]) and, where cache[2:] holds the
    mirror (K16, V^T16, its v_rows), into it too; the first `length` rows attended with the mask ->
    [D, Hq] F32 (flash attention over fp32 below MATMUL_ATTENTION_FROM rows, the mirror's two matmuls from
    there). The writes the output does not depend on are appended to `writes` (the caller adds them to the
    graph)."""
    hq, hkv, d = heads
    row = lib.ggml_reshape_3d(ctx, k, d, 1, hkv)
    fp32 = [lib.ggml_set_rows(ctx, cache[0], row, shared.position),
            lib.ggml_set_rows(ctx, cache[1], lib.ggml_reshape_3d(ctx, v, d, 1, hkv), shared.position)]
    half = []
    if len(cache) > 2:
        flat = lib.ggml_reshape_2d(ctx, cache[3], 1, capacity * d * hkv)  # V^T as S * D * Hkv rows of one
        half = [lib.ggml_set_rows(ctx, cache[2], row, shared.position),
                lib.ggml_set_rows(ctx, flat, lib.ggml_reshape_2d(ctx, v, 1, d * hkv), cache[4])]
    mask = lib.ggml_view_2d(ctx, shared.mask, length, 1, length * 2, 0)
    query = lib.ggml_reshape_3d(ctx, q, d, 1, hq)
    if not half or length < MATMUL_ATTENTION_FROM:
        writes += half
        keys, values = (lib.ggml_view_3d(ctx, c, d, length, hkv, d * 4, capacity * d * 4, 0) for c in fp32)
        return lib.ggml_flash_attn_ext(ctx, query, keys, values, mask, scale, 0.0, 0.0)  # [D, Hq, 1]
    writes += fp32
    keys = lib.ggml_view_3d(ctx, half[0], d, length, hkv, d * F16, capacity * d * F16, 0)
    kq = lib.ggml_soft_max_ext(ctx, lib.ggml_mul_mat(ctx, keys, query), mask, scale, 0.0)  # [L, 1, Hq]
    values = lib.ggml_view_3d(ctx, half[1], length, d, hkv, capacity * F16, capacity * d * F16, 0)
    return lib.ggml_mul_mat(ctx, values, kq)  # [D, 1, Hq]
