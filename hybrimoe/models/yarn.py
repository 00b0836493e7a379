"""Rotary position embedding of every family: default RoPE or YaRN, as the configs specify them.

Mixtral, Qwen and OLMoE rotate whole heads in the "half" layout; DeepSeek's MLA rotates only the
`qk_rope_head_dim` slice of each query/key head. A config's rope scaling
(`rope_scaling` in old config.json files, `rope_parameters` in transformers 5) looks like
`{"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
"beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}`.

YaRN (arXiv 2309.00071) blends two frequency sets per rotary pair i (dim d, base b):
    extrapolated  f_e[i] = b^(-2i/d)          (high frequencies, kept as trained)
    interpolated  f_i[i] = f_e[i] / factor    (low frequencies, stretched to the longer context)
    f[i] = f_i[i] * ramp[i] + f_e[i] * (1 - ramp[i]),
where ramp rises linearly from 0 to 1 between the pair indices whose wavelength makes `beta_fast`
and `beta_slow` turns over `original_max_position_embeddings` (floored/ceiled, as transformers does).
Two magnitude corrections follow, with m(s, k) = 0.1 * k * ln(s) + 1 for s > 1 (else 1):
    cos/sin are multiplied by attention_factor = m(factor, mscale) / m(factor, mscale_all_dim)
        (m(factor, 1) when either is missing);
    MLA's softmax scale qk_head_dim^-0.5 is multiplied by m(factor, mscale_all_dim)^2 (DeepSeek only).

Pair layouts of the rotated slice (q and k always use the same one, so q.k is unchanged by it):
    interleaved: pairs (x[2i], x[2i+1]) — DeepSeek's checkpoints (V2 always; V3 when rope_interleave);
    half:        pairs (x[i], x[i + d/2]) — every other family ("rotate half"); V3 with rope_interleave = False.
The rotated output is laid out as [first of each pair | second of each pair] in both cases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybrimoe.config import ROPE_TYPES
from hybrimoe.errors import ConfigError


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """m(s, k) = 0.1 * k * ln(s) + 1, or 1 when s <= 1 (no extension)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeSpec:
    """Rotary parameters of one model, normalised from a HF `rope_scaling` / `rope_parameters` dict."""

    dim: int  # rotated dims per head (qk_rope_head_dim)
    theta: float  # base b
    rope_type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # explicit override of the cos/sin multiplier
    truncate: bool = True
    interleaved: bool = True  # pair layout, see module docstring

    @classmethod
    def from_hf(
        cls,
        dim: int,
        theta: float,
        scaling: Mapping[str, Any] | None,
        max_position_embeddings: int,
        interleaved: bool = True,
    ) -> RopeSpec:
        """Build from a HF rope dict (None or type "default" = plain RoPE). Unknown types -> ConfigError."""
        if not scaling:
            return cls(dim=dim, theta=float(theta), interleaved=interleaved)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        theta = float(scaling.get("rope_theta") or theta)
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if rope_type == "default":
            return cls(dim=dim, theta=theta, interleaved=interleaved)
        original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        factor = scaling.get("factor")
        if factor is None:  # transformers: the ratio of the extended to the pretrained context
            factor = max_position_embeddings / original
        return cls(
            dim=dim,
            theta=theta,
            rope_type="yarn",
            factor=float(factor),
            original_max_position_embeddings=original,
            beta_fast=float(scaling.get("beta_fast") or 32),
            beta_slow=float(scaling.get("beta_slow") or 1),
            mscale=scaling.get("mscale"),
            mscale_all_dim=scaling.get("mscale_all_dim"),
            attention_factor=scaling.get("attention_factor"),
            truncate=bool(scaling.get("truncate", True)),
            interleaved=interleaved,
        )

    @property
    def cos_sin_scale(self) -> float:
        """Multiplier applied to cos and sin (YaRN's attention_factor; 1 for plain RoPE)."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_scale(self, qk_head_dim: int) -> float:
        """MLA's softmax scale: qk_head_dim^-0.5, times m(factor, mscale_all_dim)^2 under YaRN."""
        scale = qk_head_dim**-0.5
        if self.rope_type != "default" and self.mscale_all_dim:
            m = yarn_mscale(self.factor, self.mscale_all_dim)
            scale = scale * m * m
        return scale

    def inv_freq(self) -> torch.Tensor:
        """Angular frequency of each rotary pair, radians per position; float32 [dim/2]."""
        d, b = self.dim, self.theta
        pos_freqs = b ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d)
        extrapolated = 1.0 / pos_freqs
        if self.rope_type == "default":
            return extrapolated
        interpolated = 1.0 / (self.factor * pos_freqs)

        def correction_dim(rotations: float) -> float:  # pair index whose wavelength turns `rotations` times
            return (d * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(b)
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
        return interpolated * (1 - keep) + extrapolated * keep


class Rotary(nn.Module):
    """cos/sin tables for positions, with YaRN's magnitude correction folded in."""

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("inv_freq", spec.inv_freq(), persistent=False)  # [d/2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions LongTensor [T] -> (cos, sin), each float32 [T, d/2]. Every layer of a forward passes the
        same positions tensor: the tables of the last one are kept per spec and device, so one forward
        computes them once instead of once per layer (the identity check makes a new forward recompute)."""
        key = (self.spec, positions.device)
        last = _LAST_TABLES.get(key)
        if last is not None and last[0] is positions:
            return last[1], last[2]
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        scale = self.spec.cos_sin_scale
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        _LAST_TABLES[key] = (positions, cos, sin)
        return cos, sin


_LAST_TABLES: dict[tuple[RopeSpec, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., T, d] by cos/sin [T, d/2]; output [..., T, d] = [first | second] of each pair."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
