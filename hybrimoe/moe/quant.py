"""Expert weight formats (bf16/fp16/fp32, int8, int4) and the quantiser that produces them.

    ExpertFormat.parse("int4", compute_dtype=torch.bfloat16, group_size=32)
    ExpertFormat.parse("q4_0", ...)              int4 quantised by llama.cpp's Q4_0 rule (symmetric; `symmetric`)
    quantize_int8(w [N, K] float)                -> Int8Matrix   q int8 [N, K], scale [N]
    quantize_int4(w [N, K] float, group, symmetric=False) -> Int4Matrix   q uint8 [N, K] in 0..15, scale/offset [N, K/g]
    Int4Matrix(q, scale, offset, group)          already-quantised int4 (e.g. GGUF Q4_0 / Q4_K blocks), no re-rounding
    matrix.dequantize()                          -> float [N, K]: w = q * scale (int8), q * scale + offset (int4)

Numerics. int8: symmetric per output row, scale = max|w| / 127, q = round(w / scale) in -127..127.
int4: asymmetric per group of `g` consecutive inputs of one row with an integer zero point: the range
[min(lo, 0), max(hi, 0)] in 15 steps, scale = range / 15, zp = round(-lo / scale), q = round(w / scale) + zp
in 0..15, w' = q * scale + offset with offset = -zp * scale. Symmetric int4 (`--expert-dtype q4_0`) is
llama.cpp's Q4_0 rule (ggml quantize_row_q4_0_ref): scale = m / -8 with m the group's value of largest
magnitude (a signed scale), q = min(15, floor(w / scale + 8.5)), offset = -8 scale: the codes of a Q4_0
GGUF made from the same weights, and what ggml's fastest CPU kernel computes (hybrimoe.moe.ggml_kernels). GGUF's Q4_0
(w = d * (q - 8)) is scale = d, offset = -8 d; Q4_K (w = d * sc * q - dmin * m) is scale = d * sc,
offset = -dmin * m, both with g = 32: the 4-bit codes map over unchanged.

How a format is laid out in one expert's byte buffer (`ExpertLayout`): see hybrimoe.moe.expert_format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cost import FORMAT_NAMES

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_FORMATS = ("int8", "int4")
SYMMETRIC_INT4 = "q4_0"  # `--expert-dtype q4_0`: int4 by Q4_0's symmetric rule (ExpertFormat.symmetric)
assert FORMAT_NAMES == (*FLOAT_FORMATS, *QUANT_FORMATS, SYMMETRIC_INT4)  # policy.cost's, the same names
INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel accepts
DEFAULT_INT4_GROUP = 32  # by measurement, see benchmarks/RESULTS_formats.md


@dataclass(frozen=True)
class ExpertFormat:
    """How routed experts are stored. `compute_dtype`: the activations' dtype (the model's dtype); the
    int8/int4 scales are kept in it, and float experts of another dtype are computed in their own."""

    name: str = "fp32"  # fp32 | bf16 | fp16 | int8 | int4
    compute_dtype: torch.dtype = torch.float32
    group_size: int = DEFAULT_INT4_GROUP  # int4: inputs per scale/offset group (32, 64, 128 or 256)
    symmetric: bool = False  # int4 by Q4_0's symmetric rule (`--expert-dtype q4_0`; zero = 0 in every group)

    def __post_init__(self) -> None:
        if self.name not in FORMAT_NAMES or self.name == SYMMETRIC_INT4:
            raise ConfigError(f"unknown expert dtype {self.name!r}; supported: {', '.join(FORMAT_NAMES)}")
        if self.compute_dtype not in FLOAT_FORMATS.values():
            raise ConfigError(f"compute dtype {self.compute_dtype} must be one of fp32, bf16, fp16")
        if self.symmetric and self.name != "int4":
            raise ConfigError(f"symmetric applies to int4, not {self.name}")
        if self.name == "int4" and self.group_size not in INT4_GROUPS:
            raise ConfigError(f"int4 group size {self.group_size!r} must be one of {', '.join(map(str, INT4_GROUPS))}")

    @classmethod
    def parse(cls, name: str | None, compute_dtype: torch.dtype, group_size: int | None = None) -> ExpertFormat:
        """None = experts in the model's own dtype."""
        if name is None:
            name = next(k for k, v in FLOAT_FORMATS.items() if v == compute_dtype)
        group = DEFAULT_INT4_GROUP if group_size is None else group_size
        if name == SYMMETRIC_INT4:
            return cls("int4", compute_dtype, group, symmetric=True)
        return cls(name, compute_dtype, group)

    @property
    def quantized(self) -> bool:
        return self.name in QUANT_FORMATS

    @property
    def storage_dtype(self) -> torch.dtype:
        """Element dtype of an expert buffer: the float dtype, or uint8 (bytes) for int8/int4."""
        return FLOAT_FORMATS[self.name] if not self.quantized else torch.uint8

    def group_for(self, k: int) -> int:
        """The int4 group used for rows of length k: the largest accepted size <= group_size dividing k,
        else k itself (a tiny model; such a matrix is computed by dequantisation, not the CPU int4 kernel)."""
        for g in sorted(INT4_GROUPS, reverse=True):
            if g <= self.group_size and k % g == 0:
                return g
        return k

    def describe(self) -> str:
        if self.name != "int4":
            return self.name
        return f"int4 (group {self.group_size}{', Q4_0 symmetric' if self.symmetric else ''})"

    @property
    def cli_name(self) -> str:
        """The `--expert-dtype` value that gives this format."""
        return SYMMETRIC_INT4 if self.symmetric else self.name


@dataclass
class Int8Matrix:
    """w [N, K] ~= q * scale[:, None]."""
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(dtype) * self.scale.to(dtype)[:, None])  # [N, K]


@dataclass
class Int4Matrix:
    """w [N, K] ~= q * scale + offset, per group of `group` inputs: scale/offset [N, K / group]."""
    q: torch.Tensor  # [N, K] uint8, values 0..15
    scale: torch.Tensor  # [N, K/g] float
    offset: torch.Tensor  # [N, K/g] float
    group: int

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if k % self.group or tuple(self.scale.shape) != (n, k // self.group) or self.scale.shape != self.offset.shape:
            raise ConfigError(f"int4 matrix [{n}, {k}] with group {self.group} needs scale and offset of shape "
                              f"[{n}, {k // max(1, self.group)}], got {tuple(self.scale.shape)} and {tuple(self.offset.shape)}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.to(dtype).view(n, k // self.group, self.group)
        return (q * self.scale.to(dtype)[..., None] + self.offset.to(dtype)[..., None]).view(n, k)


def quantize_int8(w: torch.Tensor) -> Int8Matrix:
    """Symmetric per-row int8 of w [N, K] (computed in fp32)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Matrix(q, scale)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = False) -> Int4Matrix:
    """`symmetric`: llama.cpp's Q4_0 rule (`quantize_q4_0`). Otherwise asymmetric int4 of w [N, K] per group of `group` inputs with an INTEGER zero point (computed in fp32):
    the range [min(lo, 0), max(hi, 0)] in 15 steps, zp = round(-lo / scale) in 0..15, q = round(w / scale) + zp,
    so offset = -zp * scale (GPTQ's and onnxruntime MatMulNBits' convention; the onnxruntime CPU kernel
    needs it, hybrimoe.moe.ort_kernels)."""
    n, k = w.shape
    if k % group:
        raise ConfigError(f"int4 group {group} does not divide the row length {k}")
    if symmetric:
        return quantize_q4_0(w, group)
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(dim=2).clamp(max=0.0), g.amax(dim=2).clamp(min=0.0)  # [N, K/g], 0 inside the range
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    zp = torch.round(-lo / scale).clamp_(0, 15)  # [N, K/g]
    q = (torch.round(g / scale[..., None]) + zp[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return Int4Matrix(q, scale, -zp * scale, group)


def quantize_q4_0(w: torch.Tensor, group: int) -> Int4Matrix:
    """Symmetric int4 of w [N, K] by ggml's quantize_row_q4_0_ref, per group of `group` inputs (fp32): d = m / -8
    with m the signed value of largest magnitude, q = min(15, trunc(w / d + 8.5)) (1/d = 0 for an all-zero
    group), offset = -8 d. The scale is d itself (no fp16 rounding here; the store keeps it in its dtype)."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    m = g.gather(2, g.abs().argmax(dim=2, keepdim=True)).squeeze(2)  # [N, K/g]
    d = m / -8.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.trunc(g * inv[..., None] + 8.5).clamp_(max=15).to(torch.uint8).view(n, k)
    return Int4Matrix(q, d, -8.0 * d, group)


def fake_quantize(w: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """w [N, K] after the format's rounding, as fp32: the plain re-implementation the tests compare with
    (scales and offsets rounded to the compute dtype, as the store keeps them)."""
    if fmt.name in FLOAT_FORMATS:
        return w.to(FLOAT_FORMATS[fmt.name]).float()
    if fmt.name == "int8":
        m = quantize_int8(w)
        return Int8Matrix(m.q, m.scale.to(fmt.compute_dtype)).dequantize()
    m = quantize_int4(w, fmt.group_for(w.shape[1]), fmt.symmetric)
    scale, zero = stored_scale_zero(m, fmt.compute_dtype)
    n, k = m.q.shape
    q = m.q.float().view(n, k // m.group, m.group)
    return ((q - 8.0) * scale.float()[..., None] + zero.float()[..., None]).view(n, k)


def stored_scale_zero(m: Int4Matrix, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 scale and zero as stored (torch's int4 kernels' convention, w = (q - 8) * scale + zero,
    so zero = offset + 8 * scale), both [N, K/g] in `dtype`."""
    scale = m.scale.float()
    return scale.to(dtype), (m.offset.float() + 8.0 * scale).to(dtype)
