"""GGUF Q4_0 dense linears kept in 4 bits: their codes become our int4 codes without re-rounding.

    dense_int4_matrices(files, config) -> {our linear name: Int4Matrix}   for `quantize_dense(matrices=...)`

Q4_0 block (18 bytes, 32 weights of one row): fp16 d, then 16 bytes whose low nibbles are weights 0..15
and high nibbles weights 16..31; w = d * (q - 8). As an asymmetric int4 of group 32 that is
`Int4Matrix(q, scale=d, offset=-8 d, 32)` (hybrimoe.moe.quant): the codes map over unchanged, only the
scale and zero are then rounded to the model's dtype. Every other tensor type (and Q4_0 tensors when the
requested int4 group is not 32) goes the usual way: dequantised exactly, then quantised by our quantiser.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.gguf.tensors import _GLOBAL, _LAYER, _NAME, _SHARED, _shared_prefix, _unpermute
from hybrimoe.moe.quant import Int4Matrix

Q4_0_BLOCK_BYTES = 18  # fp16 d + 16 bytes of nibbles
LINEAR_PARTS = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_q_a", "attn_q_b", "attn_kv_a_mqa",
                "ffn_gate", "ffn_up", "ffn_down"}  # GGUF linears our QuantLinear may replace (not kv_b, gates)


def q4_0_matrix(data: np.ndarray) -> Int4Matrix:
    """Raw Q4_0 rows uint8 [N, K/32 * 18] -> Int4Matrix(q [N, K], d [N, K/32], -8 d, 32)."""
    n = data.shape[0]
    blocks = torch.from_numpy(np.ascontiguousarray(data)).view(n, -1, Q4_0_BLOCK_BYTES)  # [N, K/32, 18]
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()  # [N, K/32]
    nibbles = blocks[..., 2:]  # [N, K/32, 16]
    q = torch.cat((nibbles & 15, nibbles >> 4), dim=-1).reshape(n, -1)  # [N, K]: low nibbles first
    return Int4Matrix(q, d, -8.0 * d, 32)


def linear_name(config: ModelConfig, gguf_name: str) -> str | None:
    """Our module name of a GGUF dense linear's weight (None for anything else)."""
    if gguf_name == "output.weight":
        return _GLOBAL[gguf_name].removesuffix(".weight")
    m = _NAME.fullmatch(gguf_name)
    if not m or m.group(3) != "weight":
        return None
    prefix, part = f"model.layers.{m.group(1)}.", m.group(2)
    if part in _SHARED:
        return f"{prefix}{_shared_prefix(config)}.{_SHARED[part]}"
    return prefix + _LAYER[part] if part in LINEAR_PARTS else None


def dense_int4_matrices(tensors: list[tuple[str, Any, str]], config: ModelConfig) -> dict[str, Int4Matrix]:
    """{our linear name: Int4Matrix} for every Q4_0 dense linear among (name, ReaderTensor, file) triples,
    with Mixtral's q/k row permutation undone as for the float path."""
    from gguf import GGMLQuantizationType

    out: dict[str, Int4Matrix] = {}
    for name, tensor, _ in tensors:
        ours = linear_name(config, name)
        if ours is None or GGMLQuantizationType(tensor.tensor_type) != GGMLQuantizationType.Q4_0:
            continue
        m = q4_0_matrix(tensor.data)
        part = _NAME.fullmatch(name).group(2) if name != "output.weight" else ""
        if config.model_type == "mixtral" and part in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if part == "attn_q" else config.num_kv_heads
            m = Int4Matrix(_unpermute(m.q, heads), _unpermute(m.scale, heads), _unpermute(m.offset, heads), 32)
        out[ours] = m
    return out
