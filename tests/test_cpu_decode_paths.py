"""The CPU decode shortcuts compute what the general code computes.

- causal_attention on bf16/fp16 CPU tensors = the fp32 computation cast back (oneDNN's half-precision
  batched matmul builds a kernel per new shape, so the matmuls run in fp32).
- ReferenceExecutor's one-token path (no grouping) gives bit-identical sums to the grouped path, in
  bf16 too, for top-2 and top-3 (ascending expert order kept).
- ExpertStore.expert returns one view per expert, rebuilt when the store's memory is rebound.
- One CPU decode query over a long cache (plain matmuls) = the general attention, sliding window too.
- A bf16 model on the CPU caches GQA keys/values in fp32 (MLA in bf16), and the KV estimates count it.
"""

from __future__ import annotations

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.loader import build_dummy_model
from hybrimoe.models.layers import causal_attention
from hybrimoe.moe.layer import ReferenceExecutor
from hybrimoe.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,s,window", [(1, 9, None), (4, 12, None), (3, 10, 4)])
def test_half_precision_attention_is_the_fp32_computation_cast_back(dtype, t, s, window) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for shape in ((8, t, 16), (2, s, 16), (2, s, 16)))
    out = causal_attention(q, k, v, 0.25, window)
    assert out.dtype == dtype and out.shape == (t, 8 * 16)
    assert torch.equal(out, causal_attention(q.float(), k.float(), v.float(), 0.25, window).to(dtype))


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("expert_dtype", [None, "int4"])
def test_one_token_path_gives_the_grouped_sums(top_k: int, expert_dtype) -> None:
    config = ModelConfig.from_dict(tiny_config("mixtral", 256, [0], layers=2, experts=8, top_k=top_k,
                                               hidden=64).to_dict())
    model = build_dummy_model(config, "bf16", seed=3, std=0.1, expert_dtype=expert_dtype)
    executor = ReferenceExecutor(model.expert_store)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
        ids = torch.randperm(8, generator=gen)[:top_k].view(1, top_k)  # unsorted, as top-k returns them
        w = torch.rand(1, top_k, generator=gen)
        assert torch.equal(executor.run(0, x, ids, w), executor.run_grouped(0, x, ids, w))


def test_expert_views_are_built_once_per_memory() -> None:
    config = ModelConfig.from_dict(tiny_config("mixtral", 256, [0], layers=2, experts=4, hidden=64).to_dict())
    store = build_dummy_model(config, "fp32", expert_dtype="int8").expert_store
    view = store.expert(0, 1)
    assert store.expert(0, 1) is view
    flat = torch.cat([store.layer_tensor(layer).reshape(-1) for layer in store.layers])  # new memory, same bytes
    store._bind(flat)
    again = store.expert(0, 1)
    assert again is not view and again.gate_up.q.data_ptr() == store.buffer(0, 1).data_ptr()


@pytest.mark.parametrize("family,cached", [("mixtral", torch.float32), ("qwen3-moe", torch.float32),
                                           ("deepseek-v2", torch.bfloat16)])
def test_a_bf16_model_on_the_cpu_caches_gqa_keys_in_fp32(family: str, cached: torch.dtype) -> None:
    """GQA attention computes in fp32 on the CPU, so its cache is kept in fp32 (no whole-cache conversion per
    token); MLA keeps the model's dtype; the batch engine's KV estimate counts what is allocated."""
    from hybrimoe.engine.batch import BatchEngine
    from hybrimoe.models.kv_cache import kv_bytes_per_token

    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=2, experts=8, top_k=2, hidden=64).to_dict())
    model = build_dummy_model(config, "bf16", seed=3, std=0.1)
    kv = model.new_kv_cache(16)
    logits = model(torch.tensor([3, 5, 7]), 0, kv)
    assert logits.shape == (3, 256) and kv[0].k.dtype == cached and kv[0].v.dtype == cached

    class FakeEngine:  # what BatchEngine.kv_bytes reads
        max_context = 16

    FakeEngine.model = model
    assert BatchEngine.kv_bytes(FakeEngine(), 2) == 2 * 16 * kv_bytes_per_token(config, cached)
    assert kv.nbytes() == 16 * kv_bytes_per_token(config, cached)  # one sequence of 16 positions


@pytest.mark.parametrize("window", [None, 1000, 5000])
def test_one_query_over_a_long_cache_equals_the_general_attention(window, monkeypatch) -> None:
    """From LONG_DECODE_KEYS keys on, a CPU decode query attends through plain matmuls: the same result
    as the masked scaled_dot_product_attention path (the threshold lowered to reach both with one input)."""
    from hybrimoe.models import layers

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((8, 1, 16), (2, 3000, 16), (2, 3000, 16)))
    long_path = causal_attention(q, k, v, 0.25, window)  # 3000 >= 2048: the matmul path
    monkeypatch.setattr(layers, "LONG_DECODE_KEYS", 10**9)
    general = causal_attention(q, k, v, 0.25, window)
    assert long_path.shape == general.shape == (1, 8 * 16)
    assert torch.allclose(long_path, general, atol=1e-5, rtol=1e-4)
