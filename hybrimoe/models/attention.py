"""Multi-head / grouped-query attention with the family hooks of Mixtral, Qwen2/3-MoE and OLMoE.

Hooks: q/k/v bias (Qwen2-MoE), q/k RMSNorm per head (Qwen3-MoE) or over the full projected width
(OLMoE: q over heads*D, k over kv_heads*D, before the reshape into heads), clip_qkv (OLMoE),
sliding window (Mixtral). Parameter names follow the Hugging Face checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hybrimoe.config import ModelConfig
from hybrimoe.models.kv_cache import LayerKV, gqa_cache_dtype
from hybrimoe.models.layers import RMSNorm, causal_attention
from hybrimoe.models.yarn import RopeSpec, Rotary, apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = d = config.head_dim
        self.scale = d ** -0.5
        self.clip = config.clip_qkv
        self.sliding_window = config.sliding_window
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(self.num_heads * d, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * d, config.rms_norm_eps)
        spec = RopeSpec.from_hf(d, config.rope_theta, config.rope_scaling, config.max_position_embeddings,
                                interleaved=False)   # "rotate half": pairs (x[i], x[i + D/2])
        self.rotary = Rotary(spec)
        self.qkv: Any = None  # q/k/v as one matmul (StackedLinears, `stack_for_onnxruntime`); None = three

    def stack_for_onnxruntime(self) -> list[nn.Module]:
        """q/k/v projections as ONE onnxruntime matmul (StackedLinears) when all three are int4 on the CPU;
        returns the linears now computed that way ([] when not)."""
        from hybrimoe.models.quant_linear import StackedLinears

        linears = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv = StackedLinears.build(linears)
        return linears if self.qkv is not None else []

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_layers: list[LayerKV],
                lengths: list[int]) -> torch.Tensor:
        """x [N, H], positions [N] (absolute, per row) -> [N, H]. Segment i = the next lengths[i] rows: its
        k/v are appended to kv_layers[i] and its queries attend to that cache only."""
        n = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x)                                         # [N, Hq*D], [N, Hkv*D] x2
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, N, D]
        cos, sin = self.rotary(positions)                                     # [N, D/2] fp32
        q, k = apply_rotary(q, cos, sin, False), apply_rotary(k, cos, sin, False)
        cached = gqa_cache_dtype(k.dtype, k.device)                           # fp32 on the CPU for bf16/fp16
        k, v = k.to(cached), v.to(cached)
        outs, lo = [], 0
        for kv_layer, t in zip(kv_layers, lengths):
            k_all, v_all = kv_layer.append(k[:, lo:lo + t], v[:, lo:lo + t])  # [Hkv, S_i, D]
            outs.append(causal_attention(q[:, lo:lo + t], k_all, v_all, self.scale, self.sliding_window))  # [T_i, Hq*D]
            lo += t
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))   # [N, H]
