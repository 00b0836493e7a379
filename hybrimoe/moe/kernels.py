"""Computing with stored expert matrices: x [T, K] @ W^T -> [T, N], per format, device and token count.

    Int8View   q int8 [N, K], scale [N]             CPU, T <= crossover: aten._weight_int8pack_mm
    Int4View   packed uint8 [N*K/2], sz [K/g, N, 2]  CPU, T <= crossover, CPU-packed: aten._weight_int4pack_mm_for_cpu
    otherwise (more tokens, another device, a shape the CPU kernel refuses): dequantise to the compute
    dtype in plain torch ops, then F.linear. The crossovers (tokens) were measured and are recorded in
    the cost model (hybrimoe.policy.cost.CPU_FUSED_KERNEL_MAX_TOKENS); benchmarks/bench_expert_kernels.py
    measures them again. Dequantisation is device-agnostic, so the CPU tests cover the GPU path.

Views are built over slices of one expert's byte buffer (see hybrimoe.moe.expert_layout), on the
host or on the device after a copy: the stored bytes are what moves and what is computed from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybrimoe.moe.int4_layout import Int4Layout
from hybrimoe.policy.cost import CPU_FUSED_KERNEL_MAX_TOKENS

_FUSED = {"on": True}  # tests and benchmarks switch the fused CPU kernels off to compare


def set_fused_kernels(enabled: bool) -> None:
    """Turns torch's fused int8/int4 CPU kernels on or off (off = always dequantise + F.linear)."""
    _FUSED["on"] = enabled


_LOCAL = threading.local()


def workspace(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused [n, k] buffer for dequantised weights, one per thread (the CPU worker and the main thread
    dequantise at the same time) and shape. On the CPU a fresh [N, K] tensor per call page-faults its
    memory every time (~70 ms for a DeepSeek-V2-Lite gate_up on a busy 2-core VM, 40x the dequantisation);
    on CUDA the caching allocator would reuse memory anyway. Costs N*K*dtype bytes per shape and thread
    while the process runs (Mixtral bf16: 235 MB for gate_up + 117 MB for down)."""
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    key = (n, k, dtype, device)
    buf = cache.get(key)
    if buf is None:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            buf = cache[key] = torch.empty(n, k, dtype=dtype, device=device)
    return buf


def _fused_cpu(x: torch.Tensor, kind: str) -> bool:
    return _FUSED["on"] and x.device.type == "cpu" and x.shape[0] <= CPU_FUSED_KERNEL_MAX_TOKENS[kind]


@dataclass(frozen=True)
class Int8View:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] compute dtype

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the compute dtype, in this thread's workspace (valid until its next dequantisation)."""
        n, k = self.q.shape
        out = workspace(n, k, self.scale.dtype, self.q.device)
        return out.copy_(self.q).mul_(self.scale[:, None])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] (compute dtype) -> [T, N]."""
        if _fused_cpu(x, "int8"):
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)
        return F.linear(x, self.dequantize())


@dataclass(frozen=True)
class Int4View:
    packed: torch.Tensor  # [N*K/2] uint8, in `layout`'s nibble order
    sz: torch.Tensor  # [K/g, N, 2] compute dtype: (scale, zero), w = (q - 8) * scale + zero
    n: int
    k: int
    group: int
    layout: Int4Layout

    def dequantize(self) -> torch.Tensor:
        """[N, K] in the compute dtype, in this thread's workspace (valid until its next dequantisation):
        w = (q - 8) * scale + zero per group (q - 8 is exact in any float dtype: two roundings, as the
        fused kernels' convention)."""
        out = workspace(self.n, self.k, self.sz.dtype, self.packed.device)
        self.layout.unpack_into(self.packed, self.n, self.k, out)  # codes 0..15 as compute-dtype values
        scale = self.sz[..., 0].t()[..., None]  # [N, K/g, 1]
        zero = self.sz[..., 1].t()[..., None]
        groups = out.view(self.n, self.k // self.group, self.group)
        groups.sub_(8.0).mul_(scale).add_(zero)
        return out

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] (compute dtype) -> [T, N]."""
        if self.layout.cpu_kernel and self.packed.device.type == "cpu" and _fused_cpu(x, "int4"):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed.view(self.n, self.k // 2),
                                                              self.group, self.sz)
        return F.linear(x, self.dequantize())


QuantView = Int8View | Int4View


@dataclass(frozen=True)
class QuantExpert:
    """f(x) = down @ (silu(gate @ x) * (up @ x)) with gate and up as one [2I, H] matrix."""
    gate_up: QuantView  # [2I, H]
    down: QuantView  # [H, I]
    intermediate: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype (computed in the scales' dtype)."""
        dtype = self.gate_up.scale.dtype if isinstance(self.gate_up, Int8View) else self.gate_up.sz.dtype
        h = self.gate_up.matmul(x.to(dtype))  # [T, 2I]
        g, u = h.split(self.intermediate, dim=-1)
        return self.down.matmul(F.silu(g) * u).to(x.dtype)


@dataclass(frozen=True)
class FloatExpert:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype (computed in the weights' dtype)."""
        from hybrimoe.moe.layer import expert_forward

        if x.dtype == self.gate.dtype:
            return expert_forward(x, self.gate, self.up, self.down)
        return expert_forward(x.to(self.gate.dtype), self.gate, self.up, self.down).to(x.dtype)


ExpertView = QuantExpert | FloatExpert
