"""Dense linears (attention projections, dense MLPs, shared experts, optionally lm_head) in int8 or int4.

    quantize_dense(model, "int4", lm_head_dtype=None, group=32, matrices=None) -> number of linears swapped
    QuantLinear.from_linear(linear, fmt, matrix=None)                      one nn.Linear -> QuantLinear

After the checkpoint is loaded, every `nn.Linear` of the decoder layers is replaced by a `QuantLinear`
that stores its weight like a routed expert matrix (hybrimoe.moe.quant: int8 per-row symmetric, int4
asymmetric per group of `group` inputs) and computes with the experts' kernels (hybrimoe.moe.kernels:
torch's fused CPU kernel up to the token-count crossover, dequantise + F.linear above it and on other
devices). Kept in float: the routers (not nn.Linear), Qwen2-MoE's `shared_expert_gate` ([1, H], a gate
like the router), and DeepSeek MLA's `kv_b_proj` (its absorbed decode reads the weight matrix itself).
`matrices` maps a linear's qualified name (e.g. "model.layers.0.self_attn.q_proj") to an already
quantised `Int4Matrix`/`Int8Matrix` (GGUF Q4_0 blocks, hybrimoe.gguf.quantized), stored without
re-rounding the codes when its group is the linear's (else re-quantised from its dequantised values).
Shapes: x [..., K] -> [..., N]; weight [N, K].
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hybrimoe.errors import ConfigError
from hybrimoe.moe.int4_layout import PLAIN, cpu_int4_layout
from hybrimoe.moe.kernels import Int4View, Int8View
from hybrimoe.moe.quant import INT4_GROUPS, ExpertFormat, Int4Matrix, Int8Matrix, quantize_int4, quantize_int8, \
    stored_scale_zero
from hybrimoe.policy.cost import CPU_FUSED_KERNEL_MAX_TOKENS

log = logging.getLogger(__name__)

DENSE_DTYPES = ("int8", "int4", "q4_0")  # None (the default): the model's own dtype; q4_0: symmetric int4
KEEP_FLOAT = ("shared_expert_gate", "kv_b_proj")  # linears that stay in the model's dtype


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W [N, K] stored int8 ([N, K] codes, [N] scales) or int4 (packed codes in
    the CPU kernel's order, [K/g, N, 2] scale/zero), scales and bias in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, fmt: ExpertFormat, bias: torch.Tensor | None) -> None:
        super().__init__()
        if not fmt.quantized:
            raise ConfigError(f"QuantLinear needs an int8 or int4 format, got {fmt.name}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        n, k, dtype = out_features, in_features, fmt.compute_dtype
        if fmt.name == "int8":
            self.group = 0
            self.layout = None
            self.register_buffer("q", torch.empty(n, k, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(n, dtype=dtype))
        else:
            if k % 2:
                raise ConfigError(f"int4 needs an even row length, got a [{n}, {k}] linear")
            self.group = fmt.group_for(k)
            self.layout = cpu_int4_layout(n) if self.group in INT4_GROUPS else PLAIN
            self.register_buffer("q", torch.empty(n * k // 2, dtype=torch.uint8))  # packed, 2 codes a byte
            self.register_buffer("scale", torch.empty(k // self.group, n, 2, dtype=dtype))  # (scale, zero)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.ort: Any = None  # the CPU kernel's matmul: OrtMatmul (`use_onnxruntime`) or GgmlMatmul (`use_ggml`)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: ExpertFormat,
                    matrix: Int8Matrix | Int4Matrix | None = None) -> QuantLinear:
        """`linear` quantised into `fmt` (or `matrix`, already quantised, stored as is)."""
        module = cls(linear.in_features, linear.out_features, fmt, linear.bias)
        module.set_weight(linear.weight if matrix is None else matrix)
        return module.to(linear.weight.device)

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor | Int8Matrix | Int4Matrix) -> None:
        """Quantise (a float [N, K]) or take (an Int8Matrix/Int4Matrix) the weight into the buffers."""
        n, k = self.out_features, self.in_features
        self.ort = None  # an onnxruntime copy of the old weight is stale
        if isinstance(w, torch.Tensor):
            if tuple(w.shape) != (n, k):
                raise ConfigError(f"expected a [{n}, {k}] weight, got {tuple(w.shape)}")
            w = quantize_int8(w) if self.fmt.name == "int8" else quantize_int4(w, self.group, self.fmt.symmetric)
        if self.fmt.name == "int8":
            if not isinstance(w, Int8Matrix):
                raise ConfigError(f"an int8 linear takes float or Int8Matrix weights, got {type(w).__name__}")
            self.q.copy_(w.q)
            self.scale.copy_(w.scale)
            return
        if not isinstance(w, Int4Matrix):
            raise ConfigError(f"an int4 linear takes float or Int4Matrix weights, got {type(w).__name__}")
        if w.group != self.group:
            w = quantize_int4(w.dequantize(), self.group, self.fmt.symmetric)
        scale, zero = stored_scale_zero(w, self.scale.dtype)  # [N, K/g] each
        assert self.layout is not None
        self.q.copy_(self.layout.pack(w.q.to(torch.uint8).cpu()).to(self.q.device))
        self.scale.copy_(torch.stack((scale.t(), zero.t()), dim=-1))

    def view(self) -> Int8View | Int4View:
        if self.layout is None:
            return Int8View(self.q, self.scale)
        return Int4View(self.q, self.scale, self.out_features, self.in_features, self.group, self.layout)

    def dequantized_weight(self) -> torch.Tensor:
        """W [N, K] in the model's dtype (a fresh tensor)."""
        return self.view().dequantize().clone()

    def use_onnxruntime(self) -> bool:
        """Computes this linear with onnxruntime's int4 kernel from now on (int4 on the CPU with integer zero
        points only: hybrimoe.moe.ort_kernels); False when it cannot."""
        from hybrimoe.moe.ort_kernels import OrtMatmul

        view = self.view()
        if isinstance(view, Int4View) and self.q.device.type == "cpu":
            self.ort = OrtMatmul.build(view)
        return self.ort is not None

    def use_ggml(self) -> bool:
        """Computes this linear with ggml's Q4_0 kernel from now on (symmetric int4 on the CPU, `--dense-dtype
        q4_0`: hybrimoe.moe.ggml_kernels.GgmlMatmul); False when it cannot."""
        from hybrimoe.moe.ggml_kernels import GgmlMatmul

        view = self.view()
        if isinstance(view, Int4View) and self.q.device.type == "cpu":
            self.ort = GgmlMatmul.build(view)
        return self.ort is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype (computed in the scales' dtype)."""
        lead = x.shape[:-1]
        kernel = self.ort if self.ort is not None and x.device.type == "cpu" else self.view()
        y = kernel.matmul(x.reshape(-1, self.in_features).to(self.scale.dtype))  # [T, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt.describe()}"


def dense_targets(model: nn.Module) -> list[str]:
    """Qualified names of the decoder layers' linears `quantize_dense` replaces, in module order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("model.layers.")
            and name.rsplit(".", 1)[-1] not in KEEP_FLOAT]


def check_dense_dtype(name: str | None, what: str = "dense dtype") -> None:
    if name is not None and name not in DENSE_DTYPES:
        raise ConfigError(f"unknown {what} {name!r}; supported: {', '.join(DENSE_DTYPES)} "
                          "(or none: the model's --dtype)")


def quantize_dense(model: nn.Module, dense_dtype: str | None, lm_head_dtype: str | None = None,
                   group: int | None = None, matrices: dict[str, Int8Matrix | Int4Matrix] | None = None) -> int:
    """Replaces the decoder layers' dense linears by QuantLinear in `dense_dtype`, and lm_head in
    `lm_head_dtype` (int8 | int4; None: left in the model's dtype). `group`: int4 inputs
    per scale (None = the default). Returns how many linears were replaced."""
    check_dense_dtype(dense_dtype)
    check_dense_dtype(lm_head_dtype, "lm_head dtype")
    jobs = [(name, dense_dtype) for name in dense_targets(model)]
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        jobs.append(("lm_head", lm_head_dtype))
    jobs = [(name, fmt) for name, fmt in jobs if fmt is not None]
    matrices = matrices or {}
    for name, fmt_name in jobs:
        fmt = ExpertFormat.parse(fmt_name, model.dtype, group)  # scales in the model's compute dtype
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        given = matrices.get(name)  # used only for the matching kind (an Int4Matrix for int4)
        given = given if isinstance(given, Int8Matrix if fmt_name == "int8" else Int4Matrix) else None
        setattr(parent, attr, QuantLinear.from_linear(getattr(parent, attr), fmt, given))
    if jobs:
        log.info("dense linears: %d in %s, lm_head in %s", sum(n != "lm_head" for n, _ in jobs),
                 dense_dtype, lm_head_dtype or "the model's dtype")
    return len(jobs)


class StackedLinears:
    """Linears that read the same input (q/k/v projections) as ONE onnxruntime matmul: x [T, K] ->
    one [T, N_i] per linear (biases added, x's dtype). More tokens than the kernel's crossover run the
    linears one by one."""

    def __init__(self, linears: list[QuantLinear], ort: Any) -> None:
        self.linears, self.ort = linears, ort
        self.sizes = [m.out_features for m in linears]

    @classmethod
    def build(cls, linears: list[nn.Module]) -> StackedLinears | None:
        """None unless every linear is an int4 QuantLinear on the CPU that onnxruntime can compute."""
        from hybrimoe.moe.ort_kernels import OrtMatmul

        if not all(isinstance(m, QuantLinear) and m.layout is not None and m.q.device.type == "cpu"
                   for m in linears):
            return None
        ort = OrtMatmul.stacked([m.view() for m in linears])
        return None if ort is None else cls(linears, ort)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > CPU_FUSED_KERNEL_MAX_TOKENS["onnxruntime"]:
            return [m(x) for m in self.linears]
        ys = self.ort.matmul(flat.to(self.linears[0].scale.dtype)).split(self.sizes, dim=-1)  # [T, N_i] each
        out = []
        for m, y in zip(self.linears, ys):
            if m.bias is not None:
                y = y + m.bias
            out.append(y.reshape(*lead, m.out_features).to(x.dtype))
        return out
