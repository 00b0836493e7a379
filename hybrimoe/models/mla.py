"""Multi-head Latent Attention (MLA) of DeepSeek-V2 / V2-Lite / V3, batch 1.

T = new tokens, S = cached + new tokens, N = heads, L = kv_lora_rank, R = qk_rope_head_dim,
D = qk_nope_head_dim, V = v_head_dim.

    q      = W_q x                    or  W_qb rmsnorm(W_qa x)        (when q_lora_rank is set)   [T, N*(D+R)]
    c, k_r = split(W_kva x)           c: latent [T, L], k_r: one shared rotary key per token [T, R]
    cache  <- (rmsnorm(c), rope(k_r))  only L + R numbers per token and layer
    k_nope, v = split(W_kvb c)        per head [S, D] and [S, V]
    attention over k = [k_nope | k_r], q = [q_nope | rope(q_rope)], softmax scale (D+R)^-0.5 * YaRN mscale^2

Parameter names equal the HF checkpoint's under `self_attn.` so the loader can copy them one to one.
The inner RMSNorms use eps 1e-6 whatever `rms_norm_eps` says, as DeepSeek's and transformers' code do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hybrimoe.models.yarn import RopeSpec, RotaryEmbedding, apply_rotary

LATENT_NORM_EPS = 1e-6


class LatentKV(Protocol):
    """One layer's cache as MLA uses it: append rows, get every row so far back."""

    def update(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a [T, L], b [T, R] appended; returns all rows, [S, L] and [S, R]."""
        ...


@dataclass
class LatentKVLayer:
    """Preallocated latent cache of one MLA layer: rmsnorm'd latents [max, L] and rotated keys [max, R]."""

    latent: torch.Tensor  # [max_tokens, L]
    rope_key: torch.Tensor  # [max_tokens, R]
    length: int = field(default=0)

    @classmethod
    def allocate(
        cls, max_tokens: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype, device: Any = "cpu"
    ) -> "LatentKVLayer":
        return cls(
            torch.empty(max_tokens, kv_lora_rank, dtype=dtype, device=device),
            torch.empty(max_tokens, rope_dim, dtype=dtype, device=device),
        )

    def update(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + a.shape[0]
        if end > self.latent.shape[0]:
            raise ValueError(f"KV cache holds {self.latent.shape[0]} tokens; {end} requested")
        self.latent[self.length : end] = a
        self.rope_key[self.length : end] = b
        self.length = end
        return self.latent[:end], self.rope_key[:end]


class _RMSNorm(nn.Module):
    """RMSNorm computed in float32, weight applied in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def mla_rope_spec(config: Any) -> RopeSpec:
    """RopeSpec of a DeepSeek config (rotary slice qk_rope_head_dim; V2 always interleaved pairs)."""
    return RopeSpec.from_hf(
        dim=config.qk_rope_head_dim,
        theta=config.rope_theta,
        scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        interleaved=config.rope_interleave,
    )


class MLAttention(nn.Module):
    """DeepSeek MLA for one layer; forward(x [T, H], positions [T], kv_layer) -> [T, H]."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        self.num_heads = config.num_attention_heads
        self.q_lora_rank: int | None = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        n = self.num_heads

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, n * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = _RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, n * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = _RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, hidden, bias=bias)

        spec = mla_rope_spec(config)
        self.rotary = RotaryEmbedding(spec)
        self.interleaved = spec.interleaved
        self.scale = spec.softmax_scale(qk_dim)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_layer: LatentKV) -> torch.Tensor:
        t, n = x.shape[0], self.num_heads
        q = self._query(x).view(t, n, -1).transpose(0, 1)  # [N, T, D+R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, L]

        cos, sin = self.rotary(positions)  # [T, R/2]
        q_rope = apply_rotary(q_rope, cos, sin, self.interleaved)  # [N, T, R]
        k_rope = apply_rotary(k_rope, cos, sin, self.interleaved)  # [T, R]
        latent_all, k_rope_all = kv_layer.update(latent, k_rope)  # [S, L], [S, R]
        s = latent_all.shape[0]

        kv = self.kv_b_proj(latent_all).view(s, n, -1).transpose(0, 1)  # [N, S, D+V]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope_all.unsqueeze(0).expand(n, s, self.rope_dim)], dim=-1)  # [N, S, D+R]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [N, T, D+R]

        mask = None
        if t > 1:  # query i (at cache row s-t+i) sees rows 0..s-t+i
            rows = torch.arange(s, device=x.device)
            mask = rows[None, :] <= (rows[s - t :, None])  # [T, S] bool
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [N, T, V]
        return self.o_proj(out.transpose(0, 1).reshape(t, n * self.v_dim))
