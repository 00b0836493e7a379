"""Engine options: where the dense model runs and how long a context it serves.

Validated once from the keyword options of `Engine.from_pretrained(..., **runtime_options)`.
The hybrid runtime's own options (placement policy, expert cache; `hybrimoe.runtime_options`)
are separate and are handed on to it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hybrimoe.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"  # torch device of the dense weights and the KV cache
    max_context: int | None = None  # tokens (prompt + completion); None = the model's maximum
    expert_dtype: str | None = None  # routed experts: fp32 | bf16 | fp16 | int8 | int4; None = the model's dtype
    int4_group: int | None = None  # int4: inputs per scale group (32, 64, 128, 256); None = default
    dense_dtype: str | None = None  # decoder layers' linears: int8 | int4 (quantised at load); None = the model's
    lm_head_dtype: str | None = None  # lm_head: int8 | int4; None = the model's dtype
    cpu_kernel: str = "torch"  # CPU int4 matmuls: torch | onnxruntime (hybrimoe.moe.ort_kernels)

    @classmethod
    def from_kwargs(cls, **options: object) -> "EngineOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown runtime option(s) {unknown}; known: {sorted(known)}")
        result = cls(**options)  # type: ignore[arg-type]
        if result.max_context is not None and (not isinstance(result.max_context, int) or result.max_context < 2):
            raise ConfigError(f"max_context must be an integer >= 2 tokens, got {result.max_context!r}")
        check_device(result.device)
        from hybrimoe.moe.quant import ExpertFormat
        ExpertFormat.parse(result.expert_dtype, torch.float32, result.int4_group)  # ConfigError on bad names
        from hybrimoe.models.quant_linear import check_dense_dtype
        check_dense_dtype(result.dense_dtype)
        check_dense_dtype(result.lm_head_dtype, "lm_head dtype")
        from hybrimoe.moe.ort_kernels import check_cpu_kernel
        check_cpu_kernel(result.cpu_kernel)
        return result

    def weight_formats(self) -> dict[str, str | int | None]:
        """The loaders' keyword arguments for the weight formats."""
        return {"expert_dtype": self.expert_dtype, "int4_group": self.int4_group,
                "dense_dtype": self.dense_dtype, "lm_head_dtype": self.lm_head_dtype}


def check_device(device: object) -> None:
    """Raise ConfigError unless `device` names a torch device present here (before any weight loads)."""
    try:
        kind = torch.device(device).type if isinstance(device, str) and device else None
    except RuntimeError:
        kind = None
    if kind is None:
        raise ConfigError(f"device must be a torch device name such as 'cpu' or 'cuda:0', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use cpu")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {list(DTYPES)}")
    return dtype
