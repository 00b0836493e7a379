"""Multi-head Latent Attention (MLA) of DeepSeek-V2 / V2-Lite / V3, one or several sequences per call.

T = new tokens, S = cached + new tokens, N = heads, L = kv_lora_rank, R = qk_rope_head_dim,
D = qk_nope_head_dim, V = v_head_dim.

    q      = W_q x                    or  W_qb rmsnorm(W_qa x)        (when q_lora_rank is set)   [T, N*(D+R)]
    c, k_r = split(W_kva x)           c: latent [T, L], k_r: one shared rotary key per token [T, R]
    cache  <- (rmsnorm(c), rope(k_r))  only L + R numbers per token and layer
    k_nope, v = split(W_kvb c)        per head [S, D] and [S, V]
    attention over k = [k_nope | k_r], q = [q_nope | rope(q_rope)], softmax scale (D+R)^-0.5 * YaRN mscale^2

Two equal ways to attend (see `absorbed_is_cheaper`): "expanded" decompresses k_nope and v for every
cached token, as transformers does; "absorbed" folds W_kvb into the query and the output instead
(DeepSeek-V2 paper, section 2.1.2), which makes a decode step O(S * (L + R)) per head.

Parameter names equal the HF checkpoint's under `self_attn.` so the loader can copy them one to one.
The inner RMSNorms use eps 1e-6 whatever `rms_norm_eps` says, as DeepSeek's and transformers' code do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from hybrimoe.models.kv_cache import LayerKV
from hybrimoe.models.layers import RMSNorm, causal_attention
from hybrimoe.models.yarn import RopeSpec, Rotary, apply_rotary

if TYPE_CHECKING:
    from hybrimoe.config import ModelConfig

LATENT_NORM_EPS = 1e-6


def mla_rope_spec(config: ModelConfig) -> RopeSpec:
    """RopeSpec of a DeepSeek config: rotary slice qk_rope_head_dim; V2 always rotates interleaved pairs."""
    return RopeSpec.from_hf(
        dim=config.qk_rope_head_dim,
        theta=config.rope_theta,
        scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        interleaved=config.rope_interleave or config.model_type == "deepseek_v2",
    )


class MLAttention(nn.Module):
    """DeepSeek MLA for one layer; forward(x [N, H], positions [N], kv_layers, lengths) -> [N, H]."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden, bias = config.hidden_size, config.qkv_bias  # DeepSeek's attention_bias: q_a, kv_a and o
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
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, n * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, hidden, bias=config.o_bias)

        spec = mla_rope_spec(config)
        self.rotary = Rotary(spec)
        self.interleaved = spec.interleaved
        self.scale = spec.softmax_scale(qk_dim)
        self.absorb: bool | None = None  # None: pick the cheaper attention form per call (see below)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_layers: list[LayerKV],
                lengths: list[int]) -> torch.Tensor:
        """x [N, H], positions [N] absolute per row -> [N, H]. Segment i = the next lengths[i] rows: it caches
        its latent [1, T_i, L] as `k` and rotated shared key [1, T_i, R] as `v` of kv_layers[i] (L + R numbers
        per token instead of N * (D+R+V)) and attends to that cache only, in the form cheaper for its own
        T_i and S_i (a decode row of a batch takes the absorbed path as a solo decode step does)."""
        t_all, n = x.shape[0], self.num_heads
        q = self._query(x).view(t_all, n, -1).transpose(0, 1)  # [N_heads, N, D+R]
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [N, L]

        cos, sin = self.rotary(positions)  # [N, R/2]
        q_rope = apply_rotary(q_rope, cos, sin, self.interleaved)  # [N_heads, N, R]
        k_rope = apply_rotary(k_rope, cos, sin, self.interleaved)  # [N, R]
        outs, lo = [], 0
        for kv_layer, t in zip(kv_layers, lengths):
            rows = slice(lo, lo + t)
            latent_all, k_rope_all = kv_layer.append(latent[None, rows], k_rope[None, rows])  # [1, S, L], [1, S, R]
            s = latent_all.shape[1]
            absorb = self.absorb if self.absorb is not None else self.absorbed_is_cheaper(t, s)
            attend = self._attend_absorbed if absorb else self._attend_expanded
            outs.append(attend(q_nope[:, rows], q_rope[:, rows], latent_all[0], k_rope_all))  # [T_i, N_heads*V]
            lo += t
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def absorbed_is_cheaper(self, t: int, s: int) -> bool:
        """Multiply-accumulates of both attention forms for T queries over S cached tokens:
        expanded  S*L*N*(D+V)             (decompress every cached latent)  + N*T*S*(D+R+V)
        absorbed  T*N*L*(D+V)             (fold W_uk into q, W_uv after)    + N*T*S*(2L+R)
        Decoding (T = 1) favours the absorbed form; a long prefill (T = S) the expanded one."""
        n, l, d, r, v = self.num_heads, self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim
        expanded = s * l * n * (d + v) + n * t * s * (d + r + v)
        absorbed = t * n * l * (d + v) + n * t * s * (2 * l + r)
        return absorbed < expanded

    def _attend_expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> torch.Tensor:
        """q_nope [N, T, D], q_rope [N, T, R], latent [S, L], k_rope [1, S, R] -> [T, N*V] (as transformers)."""
        n, s = self.num_heads, latent.shape[0]
        kv = self.kv_b_proj(latent).view(s, n, -1).transpose(0, 1)  # [N, S, D+V]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(n, s, self.rope_dim)], dim=-1)  # [N, S, D+R]
        return causal_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, self.scale)

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> torch.Tensor:
        """Same result without decompressing the cache: q_nope.(W_uk c) = (W_uk^T q_nope).c, and
        sum_j p_j (W_uv c_j) = W_uv (sum_j p_j c_j). Shapes as in `_attend_expanded`."""
        n, t, s = self.num_heads, q_nope.shape[1], latent.shape[0]
        w = self.kv_b_proj.weight.view(n, self.nope_dim + self.v_dim, self.kv_lora_rank)  # [N, D+V, L]
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [N, D, L], [N, V, L]
        q_latent = torch.matmul(q_nope, w_uk)  # [N, T, L]
        scores = torch.matmul(q_latent, latent.t())  # [N, T, S]
        scores = (scores + torch.matmul(q_rope, k_rope.transpose(1, 2))) * self.scale
        if t > 1:  # query i sits at cache row s - t + i and sees rows 0..s - t + i
            rows = torch.arange(s, device=latent.device)
            scores = scores.masked_fill(rows[None, :] > rows[s - t :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        context = torch.matmul(probs, latent)  # [N, T, L]
        out = torch.matmul(context, w_uv.transpose(1, 2))  # [N, T, V]
        return out.transpose(0, 1).reshape(t, n * self.v_dim)
