"""int8/int4 dense linears on a CUDA device (skipped without one; benchmarks/device_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from dense_helpers import count_quantised, fake_dense_fp32
from hybrimoe.loader import load_model
from hybrimoe.models.quant_linear import dense_targets
from hybrimoe.moe.quant import ExpertFormat
from test_format_parity import PROMPTS, rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/device_check.sh runs it)")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek-v2"])
def test_cuda_dense_formats_compute_the_same_rounding(family: str, fmt: str, tiny_checkpoint) -> None:
    """On a CUDA device the quantised dense linears (and lm_head) give the logits of the fp32 model whose
    dense weights were quantised and dequantised the same way, as on the CPU (1e-4)."""
    path = tiny_checkpoint(family)
    model = load_model(path, "fp32", device="cuda", progress=False, dense_dtype=fmt, lm_head_dtype=fmt)
    reimpl = fake_dense_fp32(path, ExpertFormat(fmt, torch.float32), lm_head=True)
    assert count_quantised(model) == len(dense_targets(reimpl)) + 1
    for prompt in PROMPTS:
        ids = torch.tensor(prompt)
        got = model(ids.to("cuda"), 0, model.new_kv_cache(len(prompt)))
        want = reimpl(ids, 0, reimpl.new_kv_cache(len(prompt)))
        assert rel(got.cpu(), want) <= 1e-4, (family, fmt, rel(got.cpu(), want))
