"""Building blocks shared by every family: RMSNorm, gated MLP, causal attention (rotary: `yarn.py`).

Shapes: T = new tokens, S = cached + new tokens, H = hidden size, D = head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, result in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's fused rms_norm on x in fp32 (the same arithmetic as x * rsqrt(mean(x^2) + eps), in one op)."""
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts. [T, H] -> [T, H]."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Attention of T new queries over S = cached + new keys (the last T keys are the new tokens).

    q [Hq, T, Dk], k [Hkv, S, Dk], v [Hkv, S, Dv] with Hq = G * Hkv (GQA: query head h reads kv head
    h // G) -> [T, Hq * Dv]. Query i (absolute position S - T + i) sees key j iff j <= S - T + i
    (and S - T + i - j < window). torch's scaled_dot_product_attention with `enable_gqa` reads the cache
    in place (no repeat of the kv heads); one decode query over an unwindowed cache needs no mask
    (4x faster than the matmul/softmax ops it replaced on a 2-vCPU AMD EPYC: 95 against 389 us for
    16 query / 4 kv heads of 128 over 64 keys).
    bf16/fp16 on the CPU is computed in fp32: oneDNN's half-precision batched matmul builds a kernel for
    every new shape, and S grows by one each decode token (~0.4-2 ms per call against ~0.07 ms in fp32,
    measured on a 2-vCPU AMD EPYC, benchmarks/RESULTS_formats.md); the result is cast back.
    """
    if q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
        return causal_attention(q.float(), k.float(), v.float(), scale, sliding_window).to(q.dtype)
    t, s = q.shape[1], k.shape[1]
    if t == 1 and s >= LONG_DECODE_KEYS and q.device.type == "cpu":
        return _one_query_attention(q, k, v, scale, sliding_window)
    mask = None
    if t > 1 or (sliding_window and s > sliding_window):
        q_pos = torch.arange(s - t, s, device=q.device)[:, None]               # [T, 1]
        k_pos = torch.arange(s, device=q.device)[None, :]                      # [1, S]
        mask = k_pos <= q_pos                                                  # [T, S]
        if sliding_window:
            mask = mask & (q_pos - k_pos < sliding_window)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                         enable_gqa=True)[0]                    # [Hq, T, Dv]
    return out.transpose(0, 1).reshape(t, -1)


LONG_DECODE_KEYS = 2048  # from here on, one CPU decode query attends through plain matmuls (below)


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         sliding_window: int | None) -> torch.Tensor:
    """One query over S cached keys on the CPU: scores [Hkv, G, S] = (G query heads of a kv head) @ k^T,
    softmax, @ v. torch's CPU flash-attention kernel is slower for one query over many keys (4096 keys,
    16 query / 4 kv heads of 128: 1.6 against 3.7 ms warm, 2.4 against 3.1 ms with the cache evicted, on a
    2-vCPU AMD EPYC; equal at 1024, and 3.5x faster at 64). A sliding window keeps the last `window` keys."""
    hq, _, dk = q.shape
    hkv, s, _ = k.shape
    if sliding_window and s > sliding_window:
        k, v = k[:, s - sliding_window:], v[:, s - sliding_window:]
    scores = torch.matmul(q.reshape(hkv, hq // hkv, dk), k.transpose(1, 2)).mul_(scale)  # [Hkv, G, S]
    out = torch.matmul(torch.softmax(scores, dim=-1), v)                                 # [Hkv, G, Dv]
    return out.reshape(1, -1)                                                            # [1, Hq*Dv]
