"""Where each part of one routed expert lives in its single contiguous host buffer, per format.

Float formats (fp32/bf16/fp16): elements of that dtype, [gate (I*H) | up (I*H) | down (H*I)].
int8 / int4: bytes (uint8), gate and up quantised as ONE matrix gate_up [2I, H] (rows 0..I-1 gate):
    int8:  [gate_up q int8 (2I*H) | gate_up scale (2I, compute dtype) | down q (H*I) | down scale (H)]
    int4:  [gate_up packed (2I*H/2) | gate_up sz [H/g, 2I, 2] | down packed (H*I/2) | down sz [I/g, H, 2]]
    (sz = (scale, zero) per group, w = (q - 8) * scale + zero; every section starts at a multiple of 64 B)
int4 codes are packed in the order torch's CPU kernel reads on this machine (hybrimoe.moe.int4_layout),
so one host copy serves the CPU kernel, and a copy to the GPU moves exactly these bytes; the GPU
unpacks and dequantises them with the same layout description. Nothing packed is ever persisted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrimoe.moe.int4_layout import PLAIN, Int4Layout, cpu_int4_layout
from hybrimoe.moe.kernels import ExpertView, FloatExpert, Int4View, Int8View, QuantExpert
from hybrimoe.moe.quant import (INT4_GROUPS, ExpertFormat, Int4Matrix, Int8Matrix, quantize_int4, quantize_int8,
                                stored_scale_zero)

ALIGN = 64  # bytes


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class MatrixLayout:
    """One quantised matrix [n, k] inside an expert's byte buffer: q bytes at `q_at`, scales at `s_at`."""
    n: int
    k: int
    q_at: int
    q_bytes: int
    s_at: int
    s_bytes: int
    group: int  # int4 group (0 for int8)
    int4: Int4Layout | None  # nibble order (int4 only)

    @property
    def end(self) -> int:
        return self.s_at + self.s_bytes


class ExpertLayout:
    """Sizes and views of one expert in `fmt` for intermediate size I and hidden size H."""

    def __init__(self, fmt: ExpertFormat, intermediate: int, hidden: int, detect: bool = True) -> None:
        """`detect=False`: sizes only (no probing of torch's int4 order; views are then wrong)."""
        self.fmt, self.intermediate, self.hidden = fmt, intermediate, hidden
        self.matrices: tuple[MatrixLayout, MatrixLayout] | None = None
        if not fmt.quantized:
            self.numel = 3 * intermediate * hidden
            return
        at, mats = 0, []
        for n, k in ((2 * intermediate, hidden), (hidden, intermediate)):
            item = fmt.compute_dtype.itemsize
            if fmt.name == "int8":
                q_bytes, s_bytes, group, layout = n * k, n * item, 0, None
            else:
                if k % 2:
                    raise ValueError(f"int4 needs an even row length, got {k}")
                group = fmt.group_for(k)
                usable = group in INT4_GROUPS
                meta = torch.empty(0).device.type == "meta"  # size estimates: the order does not matter
                layout = cpu_int4_layout(n) if usable and detect and not meta else PLAIN
                q_bytes, s_bytes = n * k // 2, (k // group) * n * 2 * item
            s_at = _align(at + q_bytes)
            mats.append(MatrixLayout(n, k, at, q_bytes, s_at, s_bytes, group, layout))
            at = _align(s_at + s_bytes)
        self.matrices = (mats[0], mats[1])
        self.numel = at  # bytes

    @property
    def nbytes(self) -> int:
        return self.numel * self.fmt.storage_dtype.itemsize

    # -- views -----------------------------------------------------------------------------------
    def view(self, buffer: torch.Tensor) -> ExpertView:
        """The expert stored in `buffer` [numel] (host or device) as something with .forward(x)."""
        i, h = self.intermediate, self.hidden
        if self.matrices is None:
            n = i * h
            return FloatExpert(buffer[:n].view(i, h), buffer[n:2 * n].view(i, h), buffer[2 * n:].view(h, i))
        return QuantExpert(self._matrix(buffer, self.matrices[0]), self._matrix(buffer, self.matrices[1]), i)

    def _matrix(self, buffer: torch.Tensor, m: MatrixLayout) -> Int8View | Int4View:
        dtype = self.fmt.compute_dtype
        q = buffer[m.q_at:m.q_at + m.q_bytes]
        s = buffer[m.s_at:m.s_at + m.s_bytes].view(dtype)
        if m.int4 is None:
            return Int8View(q.view(torch.int8).view(m.n, m.k), s)
        return Int4View(q, s.view(m.k // m.group, m.n, 2), m.n, m.k, m.group, m.int4)

    # -- writing ---------------------------------------------------------------------------------
    def write_matrix(self, buffer: torch.Tensor, which: int, w: torch.Tensor | Int8Matrix | Int4Matrix) -> None:
        """Quantise (if float) and store matrix `which` (0 = gate_up [2I, H], 1 = down [H, I]) into buffer."""
        assert self.matrices is not None
        m = self.matrices[which]
        if isinstance(w, torch.Tensor):
            if tuple(w.shape) != (m.n, m.k):
                raise ValueError(f"expected a [{m.n}, {m.k}] matrix, got {tuple(w.shape)}")
            w = quantize_int8(w) if m.int4 is None else quantize_int4(w, m.group, self.fmt.symmetric)
        dtype = self.fmt.compute_dtype
        q = buffer[m.q_at:m.q_at + m.q_bytes]
        s = buffer[m.s_at:m.s_at + m.s_bytes].view(dtype)
        if m.int4 is None:
            if not isinstance(w, Int8Matrix):
                raise TypeError(f"an int8 store takes float or Int8Matrix weights, got {type(w).__name__}")
            q.view(torch.int8).copy_(w.q.reshape(-1))
            s.copy_(w.scale)
            return
        if not isinstance(w, Int4Matrix):
            raise TypeError(f"an int4 store takes float or Int4Matrix weights, got {type(w).__name__}")
        if w.group != m.group:
            w = _regroup(w, m.group, self.fmt.symmetric)
        scale, zero = stored_scale_zero(w, dtype)  # [N, K/g] each
        q.copy_(m.int4.pack(w.q.to(torch.uint8)))
        s.view(m.k // m.group, m.n, 2).copy_(torch.stack((scale.t(), zero.t()), dim=-1))


def _regroup(w: Int4Matrix, group: int, symmetric: bool = False) -> Int4Matrix:
    """`w` in the store's group size. A coarser `w` (its group a multiple of the store's) keeps its codes,
    each scale/offset repeated; a finer one cannot, and is dequantised and quantised again."""
    if w.group % group == 0:  # finer store groups: repeat each scale/offset, codes unchanged
        rep = w.group // group
        return Int4Matrix(w.q, w.scale.repeat_interleave(rep, dim=1), w.offset.repeat_interleave(rep, dim=1), group)
    return quantize_int4(w.dequantize(), group, symmetric)


def expert_nbytes(fmt: ExpertFormat, intermediate: int, hidden: int) -> int:
    """Bytes of one routed expert stored in `fmt` (codes, scales and section padding)."""
    return ExpertLayout(fmt, intermediate, hidden, detect=False).nbytes
