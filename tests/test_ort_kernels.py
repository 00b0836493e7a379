"""`--cpu-kernel onnxruntime`: int4 experts and dense linears through onnxruntime's MatMulNBits.

- one matrix, one expert, and whole tiny models of every family equal a plain fp32 re-implementation of
  what the kernel computes (int8-rounded activations per block x (q - zp) * scale; `reference_matmul`)
  to 1e-4 relative: nibble order, zero points, scales, the stacked q/k/v split and SiLU are all in it;
- every placement preset gives the plain engine's logits with it (cache slots computed by the same
  reference numerics), and the hybrid runtime's CPU side really runs the onnxruntime sessions;
- onnxruntime never reads our arrays after a session is built (the memory claim of the module);
- the int4 quantiser's zero points are integer codes; fractional ones (GGUF Q4_K) stay on torch's kernel;
- the flag: `--cpu-kernel` reaches the engine; no int4 weights, an unknown kernel or a missing package
  is a ConfigError that names the fix.
"""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import ConfigError
from hybrimoe.loader import build_dummy_model
from hybrimoe.moe import ort_kernels
from hybrimoe.moe.kernels import Int4View, QuantExpert
from hybrimoe.moe.cpu_kernels import apply_cpu_kernel
from hybrimoe.moe.ort_kernels import OrtExpert, OrtInt4, OrtMatmul, integer_zero_points
from hybrimoe.moe.quant import ExpertFormat, Int4Matrix, quantize_int4
from hybrimoe.tiny import FAMILIES, tiny_config

pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [T, K] fp32 after MLAS's int8 activation rounding: per block of `group` inputs, scale =
    max|x| / 127, round half to even (what the int8 dot product sees), returned dequantised."""
    t, k = x.shape
    blocks = x.float().view(t, k // group, group)
    scale = blocks.abs().amax(dim=2, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inv) * scale).view(t, k)


def reference_matmul(x: torch.Tensor, view: Int4View) -> torch.Tensor:
    """What OrtMatmul computes, in plain fp32 torch, from the codes as torch's layout unpacks them (not from
    the bytes handed to onnxruntime): int8-rounded activations @ ((q - zp) * scale)."""
    n, k, g = view.n, view.k, view.group
    scale, zero = view.sz[..., 0].t().float().cpu(), view.sz[..., 1].t().float().cpu()  # [N, K/g]
    zp = integer_zero_points(scale, zero)
    assert zp is not None, "a matrix with fractional zero points has no onnxruntime computation"
    codes = view.layout.unpack(view.packed.cpu(), n, k).float().view(n, k // g, g)
    weight = ((codes - zp.float()[..., None]) * scale[..., None]).view(n, k)
    return quantize_activations(x.float().cpu(), g) @ weight.t()


def linear(n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    from hybrimoe.models.quant_linear import QuantLinear

    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
    return QuantLinear.from_linear(lin, ExpertFormat("int4", dtype, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_matrix_equals_the_reference_and_hands_long_inputs_to_torch(dtype, monkeypatch) -> None:
    q = linear(96, 128, dtype)
    view = q.view()
    ort = OrtMatmul.build(view)
    assert ort is not None
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    got, want = ort.matmul(x), reference_matmul(x, view)
    assert got.dtype == dtype
    assert rel(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
    # the activation rounding is really in it: without it the reference is measurably different
    plain = x.float() @ view.dequantize().float().t()
    assert rel(want, plain) > 1e-4
    monkeypatch.setitem(ort_kernels.CPU_FUSED_KERNEL_MAX_TOKENS, "onnxruntime", 2)  # 3 rows: over the crossover
    assert torch.equal(ort.matmul(x), view.matmul(x))


def test_onnxruntime_never_reads_our_arrays_after_the_session_is_built() -> None:
    w = ort_kernels.ort_int4_weights(linear(64, 96).view())
    assert w is not None
    arrays = OrtInt4(w.codes.copy(), w.scales.copy(), w.zero_points.copy(), w.n, w.k, w.group)
    inits, feeds = [], {}
    node = ort_kernels.matmul_node("w", "x", "y", arrays, inits, feeds)
    session = ort_kernels._session([node], inits, feeds, w.k, w.n)
    x = torch.randn(2, 96)
    before = ort_kernels._run(session, x)
    for a in (arrays.codes, arrays.scales, arrays.zero_points):
        a[...] = 7  # garbage: a session that still read them would change its output
    assert torch.equal(ort_kernels._run(session, x), before)


def test_quantiser_zero_points_are_integer_codes_and_fractional_ones_are_refused() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    w[0, :32] = w[0, :32].abs() + 0.5  # a group above zero: the range is widened to include 0
    m = quantize_int4(w, 32)
    zp = -m.offset / m.scale
    assert torch.allclose(zp, zp.round(), atol=1e-4) and int(zp.min()) >= 0 and int(zp.max()) <= 15
    err = (m.dequantize() - w).abs().view(16, 2, 32).amax(dim=2)
    assert bool((err <= m.scale * 0.5 + 1e-6).all())  # every weight within half a step
    scale, zero = m.scale, m.offset + 8 * m.scale  # as stored
    got = integer_zero_points(scale, zero)
    assert got is not None and torch.equal(got.float(), zp.round())
    assert integer_zero_points(scale, zero + 0.3 * scale) is None  # Q4_K-like fractional offset
    flat = torch.zeros_like(scale)
    assert integer_zero_points(flat, torch.zeros_like(scale)) is not None  # all-zero groups: any zp
    assert integer_zero_points(flat, torch.full_like(scale, 0.5)) is None  # a constant 0.5 has none


def test_one_expert_equals_the_reference_expert() -> None:
    from hybrimoe.moe.expert_layout import ExpertLayout

    layout = ExpertLayout(ExpertFormat("int4", torch.float32, 32), 64, 96)
    buffer = torch.empty(layout.numel, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    layout.write_matrix(buffer, 0, torch.randn(128, 96, generator=gen) * 0.1)
    layout.write_matrix(buffer, 1, torch.randn(96, 64, generator=gen) * 0.1)
    view = layout.view(buffer)
    assert isinstance(view, QuantExpert)
    ort = OrtExpert.build(view)
    assert ort is not None
    x = torch.randn(4, 96, generator=gen)
    g, u = reference_matmul(x, view.gate_up).split(64, dim=-1)
    want = reference_matmul(torch.nn.functional.silu(g) * u, view.down)
    assert rel(ort.forward(x), want) <= 1e-5


@pytest.fixture
def reference_int4(monkeypatch):
    """torch's int4 path computes what the onnxruntime kernel computes (int8-rounded activations)."""
    monkeypatch.setattr(Int4View, "matmul", lambda self, x: reference_matmul(x, self).to(x.dtype))


@cache
def dummy(family: str) -> torch.nn.Module:
    top_k = 3 if family.startswith("deepseek") else 2
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=top_k, hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype="int4", dense_dtype="int4",
                             lm_head_dtype="int4")


def prefill(model, prompt=PROMPT) -> torch.Tensor:
    return model(torch.tensor(prompt), 0, model.new_kv_cache(len(prompt) + 1))


def prefill_and_decode(model, prompt=PROMPT) -> torch.Tensor:
    """Prompt logits [T, V] and one decode step's [1, V], stacked."""
    kv = model.new_kv_cache(len(prompt) + 2)
    logits = model(torch.tensor(prompt), 0, kv)
    return torch.cat([logits, model(torch.tensor([7]), len(prompt), kv)])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_equals_the_reference_with_onnxruntime(family: str, reference_int4) -> None:
    want = prefill(dummy(family))  # torch path, reference numerics
    model = copy.deepcopy(dummy(family))
    apply_cpu_kernel(model, "onnxruntime", progress=False)
    store = model.expert_store
    assert store.cpu_kernel == "onnxruntime"
    assert all(isinstance(store.expert(layer, e), OrtExpert) for layer in store.layers
               for e in range(store.config.num_experts))
    assert model.lm_head.ort is not None
    sessions = dict(store._ort)
    shared = copy.deepcopy(dummy(family), memo={id(dummy(family).expert_store): store})
    apply_cpu_kernel(shared, "onnxruntime", progress=False)  # a second model on the same store
    assert store._ort == sessions
    attentions = [m for m in model.modules() if hasattr(m, "stack_for_onnxruntime")]
    assert all(a.qkv is not None for a in attentions)  # q/k/v stacked where the family has them
    assert rel(prefill(model), want) <= 1e-4, family


@pytest.mark.parametrize("policy", ["hybrimoe", "ktransformers", "fiddler"])  # presets that use the CPU
def test_every_policy_gives_the_plain_logits_and_the_cpu_side_runs_onnxruntime(policy, reference_int4,
                                                                                  monkeypatch) -> None:
    from cpu_kernel_helpers import under_each_policy

    model = copy.deepcopy(dummy("qwen3-moe"))
    apply_cpu_kernel(model, "onnxruntime", progress=False)
    want, got, calls = under_each_policy(model, policy, OrtExpert, prefill_and_decode, monkeypatch)
    assert rel(got, want) <= 1e-4
    assert calls, f"{policy}: no expert ran on the CPU's onnxruntime sessions"


def quantized_with_fractional_offsets(store) -> tuple[Int4Matrix, Int4Matrix]:
    """gate_up and down matrices for one expert of `store`, gate_up with Q4_K-like offsets (-4.37 steps)."""
    n, k, i, h = 2 * store.intermediate, store.hidden, store.intermediate, store.hidden
    gate_up = Int4Matrix(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.full((n, k // 32), 0.01),
                         torch.full((n, k // 32), -0.0437), 32)
    return gate_up, quantize_int4(torch.randn(h, i) * 0.1, 32)


def test_fractional_zero_points_stay_on_torchs_kernel(caplog) -> None:
    model = copy.deepcopy(dummy("mixtral"))
    store = model.expert_store
    store.set_expert_quantized(0, 3, *quantized_with_fractional_offsets(store))
    with caplog.at_level("WARNING"):
        apply_cpu_kernel(model, "onnxruntime", progress=False)
    assert isinstance(store.expert(0, 3), QuantExpert) and isinstance(store.expert(0, 2), OrtExpert)
    assert "1 of 24 experts" in caplog.text


def test_the_flag_reaches_the_engine_and_bad_requests_name_the_fix(tiny_checkpoint, monkeypatch) -> None:
    import argparse

    from hybrimoe.cli.runtime_args import add_runtime_arguments, runtime_kwargs_from_args
    from hybrimoe.engine.engine import Engine

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    kwargs = runtime_kwargs_from_args(parser.parse_args(["--expert-dtype", "int4", "--cpu-kernel", "onnxruntime"]))
    assert kwargs == {"expert_dtype": "int4", "cpu_kernel": "onnxruntime"}
    path = tiny_checkpoint("qwen2-moe")
    engine = Engine.from_pretrained(path, dtype="fp32", **kwargs)
    assert engine.model.expert_store.cpu_kernel == "onnxruntime"
    with pytest.raises(ConfigError, match="--expert-dtype int4"):
        Engine.from_pretrained(path, dtype="fp32", cpu_kernel="onnxruntime")  # nothing int4
    with pytest.raises(ConfigError, match="unknown CPU kernel"):
        Engine.from_pretrained(path, dtype="fp32", cpu_kernel="mkl")
    monkeypatch.setattr(ort_kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install"):
        Engine.from_pretrained(path, dtype="fp32", expert_dtype="int4", cpu_kernel="onnxruntime")


def test_zero_point_bytes_pack_two_a_byte_low_nibble_first_per_row() -> None:
    q = linear(2, 96)  # 3 groups a row: odd, so each row's last byte is padded
    w = ort_kernels.ort_int4_weights(q.view())
    assert w is not None and w.zero_points.shape == (2 * 2,)
    zp = integer_zero_points(q.scale[..., 0].t(), q.scale[..., 1].t())
    assert zp is not None
    low, high = w.zero_points & 15, w.zero_points >> 4
    assert np.array_equal(np.stack([low, high], 1).reshape(2, 4)[:, :3], zp.numpy())


def test_calibrate_measures_the_onnxruntime_kernel(monkeypatch) -> None:
    from hybrimoe.calibrate import CalibrationSettings, calibrate

    calls = []
    forward = OrtExpert.forward
    monkeypatch.setattr(OrtExpert, "forward", lambda self, x: calls.append(x.shape[0]) or forward(self, x))
    s = CalibrationSettings(hidden=256, intermediate=128, token_counts=(1, 4), layers=2, experts_per_layer=2,
                            evict_bytes=1 << 20, device="cpu", expert_dtype="int4", cpu_kernel="onnxruntime")
    profile = calibrate(s, name="ort")
    assert profile.extra["cpu_kernel"] == "onnxruntime" and "MatMulNBits" in profile.derivations["cpu_bits"]
    assert {1, 4} <= set(calls)  # the CPU samples came from the onnxruntime sessions
    assert profile.cpu_stream_bandwidth > 0 and profile.cpu_flops > 0
    with pytest.raises(ConfigError, match="int4"):
        calibrate(CalibrationSettings(hidden=256, intermediate=128, token_counts=(1,), layers=1, device="cpu",
                                      expert_dtype="int8", cpu_kernel="onnxruntime"))


def test_a_cpu_only_engine_keeps_onnxruntimes_copy_only(tiny_checkpoint, reference_int4, monkeypatch) -> None:
    """Without the hybrid runtime nothing copies experts to a GPU: the store's own bytes are freed, and the
    sessions compute every token count (no torch fallback that would need them)."""
    from hybrimoe.engine.engine import Engine
    from hybrimoe.errors import HybrimoeError
    from hybrimoe.loader import load_model

    path = tiny_checkpoint("mixtral")
    engine = Engine.from_pretrained(path, dtype="fp32", expert_dtype="int4", cpu_kernel="onnxruntime")
    store = engine.model.expert_store
    assert store.released and store.nbytes == 0
    assert all(store.expert(layer, e).fallback is None  # nothing holds a view of the freed bytes
               for layer in store.layers for e in range(store.config.num_experts))
    with pytest.raises(HybrimoeError, match="released"):
        store.buffer(store.layers[0], 0)
    monkeypatch.setitem(ort_kernels.CPU_FUSED_KERNEL_MAX_TOKENS, "onnxruntime", 1)  # every expert over it
    want = prefill(load_model(path, "fp32", progress=False, expert_dtype="int4"))  # torch path, reference numerics
    assert rel(prefill(engine.model), want) <= 1e-4
    kept = load_model(path, "fp32", progress=False, expert_dtype="int4")
    apply_cpu_kernel(kept, "onnxruntime", progress=False)
    kept.expert_store.set_expert_quantized(0, 0, *quantized_with_fractional_offsets(kept.expert_store))
    kept.expert_store._ort.pop((0, 0))  # as if that expert had been loaded from Q4_K
    store = kept.expert_store
    layer_bytes = store.nbytes // len(store.layers)
    assert store.release_host_copy() == layer_bytes * (len(store.layers) - 1)  # every layer but layer 0
    assert not store.released and store.buffer(0, 0).numel() > 0  # layer 0 still needs its bytes
    with pytest.raises(HybrimoeError, match=f"layer {store.layers[1]}"):
        store.buffer(store.layers[1], 0)


def test_release_store_frees_each_layer_as_its_sessions_are_built(tiny_checkpoint, monkeypatch) -> None:
    """Host memory peaks at onnxruntime's copy, not at the store plus that copy: while the sessions of
    layer l are built, the layers before it are already freed (a CPU-only engine passes release_store)."""
    from hybrimoe.loader import load_model

    model = load_model(tiny_checkpoint("mixtral"), "fp32", progress=False, expert_dtype="int4")
    store, experts = model.expert_store, model.config.num_experts
    seen: list[int] = []  # the store's bytes as each session is built
    build = OrtExpert.build.__func__
    monkeypatch.setattr(OrtExpert, "build", classmethod(lambda cls, e: seen.append(store.nbytes) or build(cls, e)))
    apply_cpu_kernel(model, "onnxruntime", progress=False, release_store=True)
    per_layer = seen[0] // len(store.layers)
    assert seen == [per_layer * (len(store.layers) - i // experts) for i in range(len(seen))]
    assert store.released and store.nbytes == 0
