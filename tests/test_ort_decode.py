"""The onnxruntime decode graph (`hybrimoe.models.ort_decode`): one graph per GQA layer for decode tokens.

- every GQA family (sliding window, q/k bias, per-head and full-width q/k norms, clip, dense MLP layers,
  shared experts) gives the torch path's logits at every decode step, past Mixtral's window, in fp32;
- the graph path really runs (no torch attention during decode) and writes the KV cache the torch path
  reads on (a prompt after decode tokens, a rewind, decoding from an empty cache);
- the hybrid runtime's executors run under it and give the plain engine's logits;
- what cannot have a graph (MLA, non-int4 projections, head dims GQA cannot rotate) keeps the torch path
  and says why; a full cache is an error naming the limit.
"""

from __future__ import annotations

import logging
from functools import cache

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import HybrimoeError
from hybrimoe.loader import build_dummy_model
from hybrimoe.models.layers import RMSNorm
from hybrimoe.moe import ort_kernels
from hybrimoe.moe.cpu_kernels import apply_cpu_kernel
from hybrimoe.moe.ort_kernels import OrtExpert
from hybrimoe.tiny import tiny_config
from cpu_kernel_helpers import cache_roundtrip, torch_path_and_graph

pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

GQA_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe")
PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]
STEPS = 24  # decode tokens after PROMPT: positions 8..31 cross Mixtral's tiny window of 24


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def without_activation_rounding(build):
    """Runs `build` with MatMulNBits at accuracy level 0 (fp32 activations): the int8 rounding of level 4 is a
    step function, so a 1e-7 difference upstream (fp32 sums in another order) can move a logit by 1e-2, and
    the two paths could only be compared loosely. The graphs are the same at either level."""
    saved = ort_kernels.ACCURACY_LEVEL
    ort_kernels.ACCURACY_LEVEL = 0
    try:
        return build()
    finally:
        ort_kernels.ACCURACY_LEVEL = saved


def make(family: str, dtype: str = "fp32", dense: str | None = "int4") -> torch.nn.Module:
    """A tiny int4 model with onnxruntime kernels (Qwen3's tiny head dim of 24 set to 32: GQA's rotary needs a
    multiple of 16)."""
    overrides = {"qwen3-moe": {"head_dim": 32}, "olmoe": {"clip_qkv": 0.5}}.get(family)  # a clip that binds
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=2, hidden=64,
                                               overrides=overrides).to_dict())
    model = build_dummy_model(config, dtype, seed=1, std=0.1, expert_dtype="int4", dense_dtype=dense,
                              lm_head_dtype=dense)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):  # each its own weights (not ones)
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
    without_activation_rounding(lambda: apply_cpu_kernel(model, "onnxruntime", progress=False))
    return model


built = cache(make)


def decode_logits(model, graph: bool, tokens: list[int] | None = None, max_tokens: int = 40) -> torch.Tensor:
    """Logits [STEPS, V] of STEPS teacher-forced decode tokens after PROMPT, with or without the graph."""
    decoder = model.ort_decoder
    model.ort_decoder = decoder if graph else None
    try:
        kv = model.new_kv_cache(max_tokens)
        model(torch.tensor(PROMPT), 0, kv)
        tokens = tokens or [(7 * i + 3) % 256 for i in range(STEPS)]
        return torch.cat([model(torch.tensor([t]), len(PROMPT) + i, kv) for i, t in enumerate(tokens)])
    finally:
        model.ort_decoder = decoder


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_every_gqa_family_decodes_the_torch_paths_logits(family: str, monkeypatch) -> None:
    model = built(family)
    assert model.ort_decoder is not None
    want, got, calls = torch_path_and_graph(model, decode_logits, monkeypatch)
    assert calls == len(model.model.layers)  # the prompt only: every decode token ran the graphs
    assert rel(got, want) <= 1e-5, family
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bf16_model_decodes_as_close_to_fp32_as_the_torch_path() -> None:
    """The graph keeps the residual stream in fp32 (the torch path rounds it to bf16): not bit-equal, but no
    further from the fp32 model than the torch path is."""
    reference = decode_logits(built("mixtral"), graph=False)
    model = built("mixtral", "bf16")
    torch_error = rel(decode_logits(model, graph=False), reference)
    graph_error = rel(decode_logits(model, graph=True), reference)
    assert graph_error <= 1.5 * torch_error + 1e-3, (graph_error, torch_error)


def test_the_cache_the_graph_writes_is_the_torch_paths() -> None:
    """Graph decode tokens, then a 3-token forward (torch path) over that cache; a rewind; a first token
    decoded into an empty cache: all equal the torch path's."""
    model = built("qwen2-moe")

    assert rel(cache_roundtrip(model, True), cache_roundtrip(model, False)) <= 1e-5


def test_a_full_cache_is_an_error_naming_the_limit() -> None:
    model = built("mixtral")
    kv = model.new_kv_cache(len(PROMPT))
    model(torch.tensor(PROMPT), 0, kv)
    with pytest.raises(HybrimoeError, match="max_tokens=8"):
        model(torch.tensor([1]), len(PROMPT), kv)


def test_the_hybrid_runtime_runs_under_the_graph() -> None:
    from hybrimoe.moe.install import install_runtime
    from hybrimoe.policy.plan import LinearCosts
    from hybrimoe.runtime_options import RuntimeOptions

    model = make("mixtral")  # its own: the runtime replaces the executor
    want = decode_logits(model, graph=True)
    costs = LinearCosts(cpu_per_token=2e-5, gpu_fixed=3e-5, copy_seconds=6e-5, cpu_fixed=2e-5, cpu_first_extra=1e-5)
    runtime = install_runtime(model, RuntimeOptions(policy="hybrimoe", cache_ratio=0.25, cpu_threads=1), costs=costs)
    calls = []
    forward = OrtExpert.forward
    try:
        OrtExpert.forward = lambda self, x: calls.append(1) or forward(self, x)
        got = decode_logits(model, graph=True)
    finally:
        OrtExpert.forward = forward
        runtime.close()
    assert model.ort_decoder is not None and calls
    assert rel(got, want) <= 1e-4


@pytest.mark.parametrize("family, dense, reason", [("deepseek-v2-lite", "int4", "MLAttention attention"),
                                                   ("mixtral", None, "not int4")])
def test_what_cannot_have_a_graph_keeps_the_torch_path_and_says_why(family, dense, reason, caplog) -> None:
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=2, experts=8, top_k=2, hidden=64).to_dict())
    model = build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype="int4", dense_dtype=dense)
    with caplog.at_level(logging.INFO, logger="hybrimoe.models.ort_decode"):
        apply_cpu_kernel(model, "onnxruntime", progress=False)
    assert model.ort_decoder is None and reason in caplog.text
    kv = model.new_kv_cache(len(PROMPT) + 1)
    model(torch.tensor(PROMPT), 0, kv)
    assert model(torch.tensor([3]), len(PROMPT), kv).isfinite().all()


def test_a_head_dim_gqa_cannot_rotate_keeps_the_torch_path(caplog) -> None:
    config = ModelConfig.from_dict(tiny_config("qwen3-moe", 256, [0], layers=2, hidden=64).to_dict())  # head dim 24
    model = build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype="int4", dense_dtype="int4")
    with caplog.at_level(logging.INFO, logger="hybrimoe.models.ort_decode"):
        apply_cpu_kernel(model, "onnxruntime", progress=False)
    assert model.ort_decoder is None and "head dim 24" in caplog.text


def test_the_engine_decodes_through_the_graph(tiny_checkpoint) -> None:
    """`Engine.from_pretrained(..., cpu_kernel="onnxruntime")` with int4 dense weights builds the graphs; its
    greedy tokens equal the same engine's with the graph off (accuracy level 0: no activation rounding)."""
    from hybrimoe.engine.engine import Engine
    from hybrimoe.engine.types import SamplingParams

    engine = without_activation_rounding(lambda: Engine.from_pretrained(
        tiny_checkpoint("mixtral"), dtype="fp32", expert_dtype="int4", dense_dtype="int4", cpu_kernel="onnxruntime"))
    decoder = engine.model.ort_decoder
    assert decoder is not None
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[])
    with_graph = engine.generate(PROMPT, params).token_ids
    engine.model.ort_decoder = None
    assert engine.generate(PROMPT, params).token_ids == with_graph and len(with_graph) > 1


def test_a_cpu_only_engine_leaves_the_cores_to_onnxruntime(tiny_checkpoint) -> None:
    from hybrimoe.engine.engine import Engine

    torch.set_num_threads(2)  # the module fixture restores its own count afterwards
    Engine.from_pretrained(tiny_checkpoint("mixtral"), dtype="fp32", expert_dtype="int4", cpu_kernel="onnxruntime")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    Engine.from_pretrained(tiny_checkpoint("mixtral"), dtype="fp32", expert_dtype="int4")  # torch's kernel
    assert torch.get_num_threads() == 2


def test_a_batch_switching_between_graph_and_torch_steps_gives_each_request_its_solo_tokens(tiny_checkpoint,
                                                                                        monkeypatch) -> None:
    """BatchEngine: a step with one decoding sequence runs the graphs (bound to that sequence's cache), a step
    with two runs the torch path; the caches each path writes are the other's, so every request still gets
    the tokens it gets alone."""
    from test_batch_engine import run_batch

    from hybrimoe.engine.batch import BatchEngine
    from hybrimoe.engine.engine import Engine
    from hybrimoe.engine.types import SamplingParams
    from hybrimoe.models.ort_decode import OrtDecoder

    engine = without_activation_rounding(lambda: Engine.from_pretrained(
        tiny_checkpoint("mixtral"), dtype="fp32", expert_dtype="int4", dense_dtype="int4", cpu_kernel="onnxruntime"))
    requests = [(PROMPT, SamplingParams(max_new_tokens=10, stop_token_ids=[])),
                (PROMPT[:5], SamplingParams(max_new_tokens=4, stop_token_ids=[])),
                ([9, 8, 7, 6], SamplingParams(max_new_tokens=8, stop_token_ids=[]))]
    solo = {i: engine.generate(p, s).token_ids for i, (p, s) in enumerate(requests)}
    steps: list[str] = []  # per forward: "graph", or the segment lengths of a torch-path forward
    hidden, forward_batch = OrtDecoder.hidden, engine.model.forward_batch
    monkeypatch.setattr(OrtDecoder, "hidden", lambda self, *a: steps.append("graph") or hidden(self, *a))
    monkeypatch.setattr(engine.model, "forward_batch", lambda segments, *a, **k: steps.append(
        [int(ids.shape[0]) for ids, _, _ in segments]) or forward_batch(segments, *a, **k))
    got = run_batch(BatchEngine(engine, max_batch=2, prefill_chunk=256), requests, join_at=[0, 3, 6])
    tokens = {i: [t for chunk in chunks for t in chunk[0]] for i, chunks in got.items()}
    assert tokens == solo
    assert "graph" in steps and [1, 1] in steps  # one decoding sequence: graphs; two: the torch path
