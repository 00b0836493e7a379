"""`--cpu-kernel ggml` (int4 experts on llama.cpp's kernels) and `--expert-dtype q4_0` (Q4_0's rounding).

Without llama.cpp's libraries (CI: llama-cpp-python takes ~15 minutes to build) only the parts that need no
ggml run: the Q4_0 quantiser gives the gguf package's Q4_0 codes and scales; our blocks, decoded by the gguf
package's own Q4_0 reader, are the store's weights (asymmetric int4 has none); the flag names the fix when
the libraries are missing. With them (`pip install llama-cpp-python`):
- one expert (repacked Q4_0), one q4_0 dense linear, and a layer's experts stacked (each expert, and a decode
  token's routed experts summed in one graph), 1 and 5 tokens, equal a plain fp32 re-implementation of what
  ggml computes (activations rounded to Q8_0 per 32, fp16 block scales; `reference_matmul`) to 1e-5;
- tiny models of every family equal that reference (also with q4_0 dense weights and lm_head on ggml), and
  every placement preset gives the plain engine's
  logits while the hybrid runtime's CPU side runs ggml;
- the engine's greedy tokens equal the reference's, and a CPU-only engine keeps ggml's copy only.
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import ConfigError
from hybrimoe.loader import build_dummy_model
from hybrimoe.moe.ggml_kernels import q4_0_blocks
from hybrimoe.moe.ggml_lib import ggml_available
from hybrimoe.moe.kernels import Int4View, QuantExpert
from hybrimoe.moe.quant import ExpertFormat, quantize_int4
from hybrimoe.tiny import FAMILIES, tiny_config

needs_ggml = pytest.mark.skipif(not ggml_available(), reason="llama.cpp's ggml libraries (pip install "
                                "llama-cpp-python) are not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def half(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def expert_view(fmt: ExpertFormat, intermediate: int = 64, hidden: int = 96, seed: int = 3) -> QuantExpert:
    from hybrimoe.moe.expert_layout import ExpertLayout

    layout = ExpertLayout(fmt, intermediate, hidden)
    buffer = torch.empty(layout.numel, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    layout.write_matrix(buffer, 0, torch.randn(2 * intermediate, hidden, generator=gen) * 0.1)
    layout.write_matrix(buffer, 1, torch.randn(hidden, intermediate, generator=gen) * 0.1)
    view = layout.view(buffer)
    assert isinstance(view, QuantExpert)
    return view


def store_weights(view: Int4View) -> torch.Tensor:
    """What ggml computes with, from the store's codes and scales (not from our blocks): (q - 8) * fp16(scale),
    [N, K]."""
    n, k, g = view.n, view.k, view.group
    assert bool((view.sz[..., 1] == 0).all()), "symmetric int4 only"
    scale = view.sz[..., 0].t().float().repeat_interleave(g // 32, dim=1)  # [N, K/32]
    codes = view.layout.unpack(view.packed, n, k).float().view(n, k // 32, 32)
    return ((codes - 8) * half(scale)[..., None]).view(n, k)


def reference_matmul(x: torch.Tensor, view: Int4View) -> torch.Tensor:
    """x [T, K] @ W^T as ggml computes it, in plain fp32: x rounded to Q8_0 per 32 (d = max|x| / 127 stored
    in fp16, codes round(x * 127 / max|x|), halves to even as ggml's AVX quantiser), times `store_weights`."""
    t, k = x.shape
    blocks = x.float().view(t, k // 32, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (codes * half(amax / 127.0)).view(t, k) @ store_weights(view).t()


def reference_expert(view: QuantExpert, x: torch.Tensor) -> torch.Tensor:
    g, u = reference_matmul(x, view.gate_up).split(view.intermediate, dim=-1)
    return reference_matmul(torch.nn.functional.silu(g) * u, view.down)


def test_the_q4_0_quantiser_gives_the_gguf_packages_q4_0() -> None:
    from gguf import GGMLQuantizationType, quants

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    w[3, :32] = 0.0  # an all-zero block
    w[5, 40] = -w[5, 32:64].abs().max() - 1  # a negative extreme: a positive d
    m = quantize_int4(w, 32, symmetric=True)
    blocks = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(48, 8, 18)
    qs = torch.from_numpy(blocks[..., 2:].copy())
    codes = torch.cat((qs & 15, qs >> 4), dim=-1).view(48, 256)  # weight j low, j + 16 high
    d = torch.from_numpy(blocks[..., :2].copy()).view(torch.float16).float().squeeze(-1)  # [48, 8]
    assert torch.equal(codes, m.q)
    assert torch.equal(d, half(m.scale))
    assert torch.equal(m.offset, -8 * m.scale)
    assert (m.q[3, :32] == 8).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_our_blocks_read_back_by_the_gguf_package_are_the_stores_weights(group) -> None:
    from gguf import GGMLQuantizationType, quants

    view = expert_view(ExpertFormat.parse("q4_0", torch.bfloat16, group), intermediate=128, hidden=256)
    for matrix in (view.gate_up, view.down):
        assert isinstance(matrix, Int4View)
        blocks = q4_0_blocks(matrix)
        assert blocks is not None and blocks.shape == (matrix.n, matrix.k // 32, 18)
        decoded = torch.from_numpy(quants.dequantize(blocks.reshape(matrix.n, -1), GGMLQuantizationType.Q4_0).copy())
        scale = matrix.sz[..., 0].t().float()  # [N, K/g] (bf16 values: fp16 holds them exactly)
        codes = matrix.layout.unpack(matrix.packed, matrix.n, matrix.k).float().view(matrix.n, -1, group)
        assert torch.equal(decoded, ((codes - 8) * scale[..., None]).view(matrix.n, matrix.k))
    asymmetric = expert_view(ExpertFormat.parse("int4", torch.bfloat16, group), intermediate=128, hidden=256)
    assert q4_0_blocks(asymmetric.gate_up) is None  # Q4_1: no fast ggml kernel, stays on torch's


def test_a_missing_library_names_the_fix(tiny_checkpoint, monkeypatch) -> None:
    from hybrimoe.engine.engine import Engine
    from hybrimoe.moe import ggml_lib

    monkeypatch.setattr(ggml_lib, "ggml_library_dir", lambda: None)
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        Engine.from_pretrained(tiny_checkpoint("mixtral"), dtype="fp32", expert_dtype="q4_0", cpu_kernel="ggml")


@needs_ggml
@pytest.mark.parametrize("tokens", [1, 5])
def test_one_expert_equals_the_reference(tokens) -> None:
    from hybrimoe.moe.ggml_kernels import GgmlExpert

    view = expert_view(ExpertFormat.parse("q4_0", torch.float32, 32))
    expert = GgmlExpert.build(view)
    assert expert is not None
    for seed in range(3):  # the one-token graph is cached: it must take new inputs every call
        x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(seed))
        assert rel(expert.forward(x), reference_expert(view, x)) <= 1e-5
    assert expert.forward(x.bfloat16()).dtype == torch.bfloat16


@needs_ggml
def test_a_stacked_layer_equals_the_reference_expert_by_expert(monkeypatch) -> None:
    """GgmlLayerExperts: each expert's views (1 and 5 tokens) and `combine` (a decode token's routed experts
    and their weighted sum, slots in any order) against the reference; its memory goes with it."""
    import gc

    from hybrimoe.moe.ggml_kernels import GgmlLayerExperts
    from hybrimoe.moe.ggml_lib import ggml_runtime

    lib = ggml_runtime()
    freed: list[int] = []
    free = lib.free
    monkeypatch.setattr(lib, "free", lambda contexts, buffers, allocators=None:
                        freed.append(len(contexts) + len(buffers)) or free(contexts, buffers, allocators))
    fmt = ExpertFormat.parse("q4_0", torch.float32, 32)
    views = [expert_view(fmt, seed=s) for s in range(4)]
    layer = GgmlLayerExperts.build(views)
    assert layer is not None and layer.nbytes == sum(layer.views[e].nbytes for e in range(4))
    gen = torch.Generator().manual_seed(5)
    for e in range(4):
        x = torch.randn(5, 96, generator=gen)
        assert rel(layer.views[e].forward(x), reference_expert(views[e], x)) <= 1e-5
        assert rel(layer.views[e].forward(x[:1]), reference_expert(views[e], x[:1])) <= 1e-5
    for ids in ([2, 0], [3, 1, 0], [1, 2]):  # k = 2 twice (its graph reused with new inputs), k = 3
        x, w = torch.randn(1, 96, generator=gen), torch.rand(len(ids), generator=gen)
        want = sum(w[j] * reference_expert(views[e], x) for j, e in enumerate(ids))
        assert rel(layer.combine(x, ids, w), want) <= 1e-5
    assert layer.combine(x.bfloat16(), ids, w).dtype == torch.bfloat16
    del layer
    gc.collect()
    assert sorted(freed) == [1] * 4 + [2] * 7  # 4 views (context); 4 one-token graphs, weights, 2 combine graphs


@needs_ggml
@pytest.mark.parametrize("tokens", [1, 5])
def test_one_linear_equals_the_reference(tokens) -> None:
    """A q4_0 dense linear on ggml (`QuantLinear.use_ggml`), group 64 (two Q4_0 blocks per scale)."""
    from hybrimoe.models.quant_linear import QuantLinear
    from hybrimoe.moe.ggml_kernels import GgmlMatmul

    linear = torch.nn.Linear(128, 40, bias=True)
    quant = QuantLinear.from_linear(linear, ExpertFormat.parse("q4_0", torch.float32, 64))
    assert quant.use_ggml() and isinstance(quant.ort, GgmlMatmul)
    for seed in range(3):
        x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(seed))
        want = reference_matmul(x, quant.view()) + quant.bias
        assert rel(quant(x), want) <= 1e-5
    asymmetric = QuantLinear.from_linear(linear, ExpertFormat.parse("int4", torch.float32, 64))
    assert not asymmetric.use_ggml() and asymmetric.ort is None


@pytest.fixture
def reference_int4(monkeypatch):
    """torch's int4 path computes what the ggml kernel computes (Q8-rounded activations)."""
    monkeypatch.setattr(Int4View, "matmul", lambda self, x: reference_matmul(x, self).to(x.dtype))


@cache
def dummy(family: str, dense: str | None = None) -> torch.nn.Module:
    top_k = 3 if family.startswith("deepseek") else 2
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=top_k, hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype="q4_0", dense_dtype=dense,
                             lm_head_dtype=dense)


def prefill_and_decode(model, prompt=PROMPT) -> torch.Tensor:
    """Prompt logits [T, V] and one decode step's [1, V], stacked."""
    kv = model.new_kv_cache(len(prompt) + 2)
    logits = model(torch.tensor(prompt), 0, kv)
    return torch.cat([logits, model(torch.tensor([7]), len(prompt), kv)])


@needs_ggml
@pytest.mark.parametrize("family,dense", [(f, None) for f in FAMILIES] + [("qwen2-moe", "q4_0"), ("deepseek-v2", "q4_0")])
def test_every_family_equals_the_reference_with_ggml(family: str, dense: str | None, reference_int4) -> None:
    """Experts on ggml; with q4_0 dense weights and lm_head every such linear on ggml too (prompt and decode;
    the GQA family's decode token as ggml_decode's graphs, MLA's through the torch path)."""
    from hybrimoe.models.quant_linear import QuantLinear
    from hybrimoe.moe.ggml_kernels import GgmlExpert, GgmlMatmul
    from hybrimoe.moe.cpu_kernels import apply_cpu_kernel

    want = prefill_and_decode(dummy(family, dense))  # torch path, reference numerics
    model = copy.deepcopy(dummy(family, dense))
    apply_cpu_kernel(model, "ggml", progress=False)
    store = model.expert_store
    assert store.cpu_kernel == "ggml"
    assert all(isinstance(store.expert(layer, e), GgmlExpert) for layer in store.layers
               for e in range(store.config.num_experts))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert bool(linears) == (dense is not None) and isinstance(model.lm_head, QuantLinear) == (dense is not None)
    assert all(isinstance(m.ort, GgmlMatmul) for m in linears)
    assert rel(prefill_and_decode(model), want) <= 1e-4, family


@needs_ggml
@pytest.mark.parametrize("policy", ["hybrimoe", "ktransformers", "fiddler"])  # presets that use the CPU
def test_every_policy_gives_the_plain_logits_and_the_cpu_side_runs_ggml(policy, reference_int4,
                                                                           monkeypatch) -> None:
    from cpu_kernel_helpers import under_each_policy

    from hybrimoe.moe.ggml_kernels import GgmlExpert
    from hybrimoe.moe.cpu_kernels import apply_cpu_kernel

    model = copy.deepcopy(dummy("qwen3-moe"))
    apply_cpu_kernel(model, "ggml", progress=False)
    want, got, calls = under_each_policy(model, policy, GgmlExpert, prefill_and_decode, monkeypatch)
    assert rel(got, want) <= 1e-4
    assert calls, f"{policy}: no expert ran on the CPU's ggml kernels"


@needs_ggml
def test_the_engine_gives_the_references_tokens_and_keeps_ggmls_copy_only(tiny_checkpoint, reference_int4) -> None:
    from hybrimoe.engine.engine import Engine
    from hybrimoe.engine.types import SamplingParams

    path = tiny_checkpoint("mixtral")
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[])
    want = Engine.from_pretrained(path, dtype="fp32", expert_dtype="q4_0").generate(PROMPT, params).token_ids
    engine = Engine.from_pretrained(path, dtype="fp32", expert_dtype="q4_0", cpu_kernel="ggml")
    store = engine.model.expert_store
    assert store.cpu_kernel == "ggml" and store.released  # CPU-only: the store's own bytes went
    assert engine.generate(PROMPT, params).token_ids == want and len(want) == 12
    dense = {"dense_dtype": "q4_0", "lm_head_dtype": "q4_0"}  # and the decode tokens as ggml graphs
    want = Engine.from_pretrained(path, dtype="fp32", expert_dtype="q4_0", **dense).generate(PROMPT, params).token_ids
    engine = Engine.from_pretrained(path, dtype="fp32", expert_dtype="q4_0", cpu_kernel="ggml", **dense)
    assert type(engine.model.ort_decoder).__name__ == "GgmlDecoder"
    assert engine.generate(PROMPT, params).token_ids == want
    for asymmetric in (None, "int4"):  # nothing int4; asymmetric int4 (ggml's Q4_1: slower than torch's)
        with pytest.raises(ConfigError, match="--expert-dtype q4_0"):
            Engine.from_pretrained(path, dtype="fp32", expert_dtype=asymmetric, cpu_kernel="ggml")


@needs_ggml
def test_ggmls_memory_goes_with_the_expert(monkeypatch) -> None:
    import gc

    from hybrimoe.moe.ggml_kernels import GgmlExpert
    from hybrimoe.moe.ggml_lib import ggml_runtime

    lib = ggml_runtime()
    freed: list[int] = []
    monkeypatch.setattr(lib, "free", lambda contexts, buffers, allocators=None: freed.append(len(contexts) + len(buffers)))
    expert = GgmlExpert.build(expert_view(ExpertFormat.parse("q4_0", torch.float32, 32)))
    expert.forward(torch.randn(1, 96))  # caches a one-token graph: its memory too
    del expert
    gc.collect()
    assert sorted(freed) == [2, 2]  # weights (context, buffer) and the graph (context, buffer)
