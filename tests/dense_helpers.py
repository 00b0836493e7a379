"""Helpers of the dense-format tests (no gguf import: the CUDA test runs where `gguf` may be missing)."""

from __future__ import annotations

import torch

from hybrimoe.loader import load_model
from hybrimoe.models.quant_linear import QuantLinear, dense_targets
from hybrimoe.moe.quant import ExpertFormat, fake_quantize


def fake_dense_fp32(path, fmt: ExpertFormat, lm_head: bool):
    """The fp32 model with every quantised-to-be dense weight replaced by its quantise-dequantise image."""
    model = load_model(path, "fp32", progress=False)
    names = dense_targets(model) + (["lm_head"] if lm_head else [])
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            w.copy_(fake_quantize(w, fmt))
    return model


def count_quantised(model) -> int:
    return sum(isinstance(m, QuantLinear) for m in model.modules())
