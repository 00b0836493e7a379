"""Building blocks shared by every family: RMSNorm, gated MLP, rotary embedding, causal attention.

Shapes: T = new tokens, S = cached + new tokens, H = hidden size, D = head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrimoe.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, result in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts. [T, H] -> [T, H]."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(config: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] fp32, attention_scaling) for the config's RoPE variant.

    Default RoPE: inv_freq_i = theta^(-2i/dim), scaling 1. YaRN lives in `hybrimoe.models.yarn`.
    """
    rope_type = (config.rope_scaling or {}).get("rope_type", "default")
    if rope_type == "yarn":
        from hybrimoe.models.yarn import yarn_frequencies  # DeepSeek-style context extension
        return yarn_frequencies(config, dim)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; rotates q/k of head dim D in the "rotate half" convention."""

    def __init__(self, config: ModelConfig, dim: int) -> None:
        super().__init__()
        inv_freq, self.scaling = rope_frequencies(config, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)   # [D/2] fp32

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, D] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]   # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, D], cos/sin [T, D] -> x rotated by position."""
    return x * cos + rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Attention of T new queries over S = cached + new keys (the last T keys are the new tokens).

    q [Hq, T, Dk], k [Hkv, S, Dk], v [Hkv, S, Dv] with Hq = G * Hkv (GQA: query head h reads kv head
    h // G) -> [T, Hq * Dv]. Query i (absolute position S - T + i) sees key j iff j <= S - T + i
    (and S - T + i - j < window). The G query heads of a kv head are stacked as rows, so the cache is
    read in place instead of being repeated G times.
    """
    hq, t, dk = q.shape
    hkv, s, _ = k.shape
    g = hq // hkv
    q_pos = torch.arange(s - t, s, device=q.device)[:, None]                   # [T, 1]
    k_pos = torch.arange(s, device=q.device)[None, :]                          # [1, S]
    allowed = k_pos <= q_pos                                                   # [T, S]
    if sliding_window:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    qg = q.reshape(hkv, g * t, dk)                                             # rows: (group j, token i)
    scores = torch.matmul(qg, k.transpose(1, 2)) * scale                       # [Hkv, G*T, S]
    scores = scores.masked_fill(~allowed.repeat(g, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)                                               # [Hkv, G*T, Dv]
    return out.view(hq, t, -1).transpose(0, 1).reshape(t, -1)
