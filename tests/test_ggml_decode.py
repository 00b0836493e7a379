"""The ggml decode graphs (`hybrimoe.models.ggml_decode`): a GQA layer's whole decode token (q/k/v/o,
norms, rotary, attention on our KV cache, router) as one ggml graph, for `--cpu-kernel ggml` with
`--dense-dtype q4_0`. Needs llama.cpp's libraries.

- every GQA family (sliding window, q/k bias, per-head and full-width q/k norms, clip, dense MLP layers,
  shared experts, Qwen3's head dim of 24) gives the torch path's logits at every decode step, past Mixtral's
  window, when the torch path computes its int4 matmuls as ggml does (`reference_matmul` of
  test_ggml_kernels), with the attended length rounded to the cache's capacity or to small chunks;
- the graphs really run (no torch attention during decode) and write the KV cache the torch path reads;
- asymmetric int4 dense weights keep onnxruntime's decode graph and say why.
"""

from __future__ import annotations

import logging
from functools import cache

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.loader import build_dummy_model
from hybrimoe.models.attention import Attention
from hybrimoe.models.layers import RMSNorm
from hybrimoe.models.quant_linear import QuantLinear
from hybrimoe.moe.ggml_lib import ggml_available
from hybrimoe.moe.kernels import Int4View
from hybrimoe.tiny import tiny_config
from cpu_kernel_helpers import cache_roundtrip, torch_path_and_graph
from test_ggml_kernels import reference_matmul

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not ggml_available(), reason="llama.cpp's ggml libraries (pip install "
                                 "llama-cpp-python) are not installed")]

GQA_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe")
PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]
STEPS = 24  # decode tokens after PROMPT: positions 8..31 cross Mixtral's tiny window of 24


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


YARN = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}}


@cache
def built(family: str, dense: str = "q4_0", yarn: bool = False, head: str | None = None) -> torch.nn.Module:
    """A tiny q4_0 model on ggml. Its dense linears then drop their onnxruntime sessions (where onnxruntime is
    installed), so that the torch path computes them through Int4View.matmul (the `reference` fixture makes
    that ggml's numerics)."""
    from hybrimoe.moe.cpu_kernels import apply_cpu_kernel

    overrides = {"olmoe": {"clip_qkv": 0.5}}.get(family, {}) | (YARN if yarn else {})  # a clip that binds
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=2, hidden=64,
                                               overrides=overrides).to_dict())
    model = build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype="q4_0", dense_dtype=dense,
                              lm_head_dtype=head)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):  # each its own weights (not ones)
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
    apply_cpu_kernel(model, "ggml", progress=False)
    for module in model.modules():
        if isinstance(module, QuantLinear) and module is not model.lm_head:  # (lm_head: ggml's kernel on both paths)
            module.ort = None
        if isinstance(module, Attention):
            module.qkv = None
    return model


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(Int4View, "matmul", lambda self, x: reference_matmul(x, self).to(x.dtype))


def decode_logits(model, graph: bool, max_tokens: int = 40) -> torch.Tensor:
    """Logits [STEPS, V] of STEPS teacher-forced decode tokens after PROMPT, with or without the graphs."""
    decoder = model.ort_decoder
    model.ort_decoder = decoder if graph else None
    try:
        kv = model.new_kv_cache(max_tokens)
        model(torch.tensor(PROMPT), 0, kv)
        tokens = [(7 * i + 3) % 256 for i in range(STEPS)]
        return torch.cat([model(torch.tensor([t]), len(PROMPT) + i, kv) for i, t in enumerate(tokens)])
    finally:
        model.ort_decoder = decoder


WHOLE_TOKEN = GQA_FAMILIES  # softmax top-k routers (a shared expert, dense MLP layers): one graph per token


@pytest.mark.parametrize("family,chunk,yarn,whole", [(f, 256, False, True) for f in GQA_FAMILIES]
                         + [("mixtral", 8, False, True), ("qwen3-moe", 8, False, True), ("qwen3-moe", 256, True, True)]
                         + [(f, c, False, False) for f, c in (("mixtral", 256), ("olmoe", 8), ("qwen2-moe", 256))])
def test_every_gqa_family_decodes_the_torch_paths_logits(family: str, chunk: int, yarn: bool, whole: bool, reference,
                                                         monkeypatch) -> None:
    """chunk 256: every graph attends to the whole (40-token) cache; 8: to 16, 24, 32, 40 rows as it fills.
    yarn: YaRN's frequencies and magnitude scale (factor 4) reach ggml's rotary. whole: the families that can
    run a token as one graph do (ggml_token); False: the per-layer graphs (experts fused into the next one)."""
    from hybrimoe.models import ggml_decode
    from hybrimoe.models.ggml_decode import GgmlDecoder

    monkeypatch.setattr(ggml_decode, "KV_CHUNK", chunk)
    if not whole:
        monkeypatch.setattr(ggml_decode, "token_experts", lambda *args: None)
    model = built(family, yarn=yarn)
    decoder = model.ort_decoder
    decoder._unbind()  # graphs built for this chunk
    assert isinstance(decoder, GgmlDecoder)
    computes = []
    compute = decoder._compute
    monkeypatch.setattr(decoder, "_compute", lambda graph: computes.append(1) or compute(graph))
    want, got, calls = torch_path_and_graph(model, decode_logits, monkeypatch)
    assert calls == len(model.model.layers)  # the prompt only: every decode token ran the graphs
    per_token = 1 if whole and family in WHOLE_TOKEN else len(model.model.layers)
    assert len(computes) == STEPS * per_token
    assert rel(got, want) <= 1e-4, family
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2-moe"])  # renormalised / not; a shared expert, a dense layer
def test_the_whole_token_graph_tells_the_observer_the_torch_paths_routing(family: str, reference) -> None:
    """The routing a whole-token graph computes (read back after it) reaches the observer layer by layer:
    the torch path's experts, in its order (highest score first), weights and softmax scores."""
    model = built(family)
    hooks = model.model.layers[0].mlp.hooks
    seen: dict[bool, list] = {True: [], False: []}
    for graph in (True, False):
        hooks.observer = lambda layer, r, graph=graph: seen[graph].append((layer, r.expert_ids, r.weights, r.scores))
        try:
            decode_logits(model, graph)
        finally:
            hooks.observer = None
    moe_layers = sum(hasattr(layer.mlp, "route_logits") for layer in model.model.layers)
    assert len(seen[True]) == len(seen[False]) == (1 + STEPS) * moe_layers
    for (layer, ids, weights, scores), (want_layer, want_ids, want_weights, want_scores) in zip(*seen.values()):
        assert layer == want_layer and ids.dtype == torch.long and torch.equal(ids, want_ids)
        assert weights.shape == want_weights.shape and torch.allclose(weights, want_weights, atol=1e-5)
        assert scores.shape == want_scores.shape and torch.allclose(scores, want_scores, atol=1e-5)


def test_a_q4_0_lm_head_ends_the_whole_token_graph(reference, monkeypatch) -> None:
    """With lm_head in Q4_0 on ggml, the final norm and lm_head are the graph's last ops (the model's own
    norm and head do not run during decode): the torch path's logits."""
    model = built("qwen3-moe", head="q4_0")
    assert model.lm_head.use_ggml()
    want = decode_logits(model, False)
    norms = []
    norm = model.model.norm.forward
    monkeypatch.setattr(model.model.norm, "forward", lambda x: norms.append(1) or norm(x))
    got = decode_logits(model, True)
    assert len(norms) == 1  # the prompt's forward only
    assert rel(got, want) <= 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_cache_the_graphs_write_is_the_torch_paths(reference) -> None:
    """Graph decode tokens, then a 3-token forward (torch path) over that cache; a rewind; a first token
    decoded into an empty cache: all equal the torch path's."""
    model = built("qwen2-moe")

    assert rel(cache_roundtrip(model, True), cache_roundtrip(model, False)) <= 1e-4


def test_asymmetric_int4_dense_weights_keep_onnxruntimes_graph(caplog) -> None:
    from hybrimoe.models.ort_decode import OrtDecoder

    pytest.importorskip("onnxruntime", reason="its decode graph")
    with caplog.at_level(logging.INFO):
        model = built("mixtral", "int4")
    assert type(model.ort_decoder) is OrtDecoder
    assert "--dense-dtype q4_0" in caplog.text


def test_fused_routing_is_observed_and_the_hybrid_runtime_gets_every_expert(reference, monkeypatch) -> None:
    """Where a layer's experts run inside the next layer's graph, the observer still sees every layer's
    routing (as on the torch path); under the hybrid runtime (its own executor) every routed expert goes
    through the executor again, with the same logits."""
    from cpu_kernel_helpers import under_each_policy

    from hybrimoe.moe.ggml_kernels import GgmlExpert

    model = built.__wrapped__("mixtral")  # a model of its own: the runtime changes its executors
    assert all(f is not None for f in model.ort_decoder._fused(model)[:-1])
    seen: dict[bool, list] = {True: [], False: []}
    hooks = model.model.layers[0].mlp.hooks
    for graph in (True, False):
        hooks.observer = lambda layer, record, graph=graph: seen[graph].append((layer, record.expert_ids.tolist()))
        decode_logits(model, graph)
    hooks.observer = None
    assert seen[True] == seen[False]
    assert len(seen[True]) == (1 + STEPS) * len(model.model.layers)  # the prompt (one forward) and every step
    want, got, calls = under_each_policy(model, "hybrimoe", GgmlExpert, lambda m: decode_logits(m, True), monkeypatch)
    assert rel(got, want) <= 1e-4 and calls


def f16_cache_attention(monkeypatch, start: int) -> None:
    """The torch path's one-query attention as llama.cpp's default F16 cache computes it (flash attention off)
    where the graphs attend to at least `start` rows (KV_CHUNK 8: the keys rounded up to 8): q, k, v and the
    softmax weights rounded to fp16, sums in fp32; prompts and shorter ones keep torch's own attention."""
    from hybrimoe.models import attention

    causal = attention.causal_attention

    def f16(q, k, v, scale, window=None):
        if q.shape[1] != 1 or -(-k.shape[1] // 8) * 8 < start:
            return causal(q, k, v, scale, window)
        (hq, _, d), (hkv, s, _) = q.shape, k.shape
        h = lambda x: x.half().float()  # noqa: E731
        scores = torch.einsum("hgd,hsd->hgs", h(q).view(hkv, hq // hkv, d), h(k)) * scale
        if window:
            scores[..., :max(0, s - window)] = -float("inf")
        return torch.einsum("hgs,hsd->hgd", h(torch.softmax(scores, -1)), h(v)).reshape(1, hq * d)

    monkeypatch.setattr(attention, "causal_attention", f16)


@pytest.mark.parametrize("family,start", [(f, 8) for f in GQA_FAMILIES] + [("mixtral", 24)])
def test_long_contexts_read_an_f16_copy_of_the_cache_as_llamacpp_does(family: str, start: int, reference,
                                                                      monkeypatch) -> None:
    """From MATMUL_ATTENTION_FROM attended rows (8: every decode token; 24: the copy made mid-way, from the rows
    the graphs wrote so far) the graphs read their F16 copy of the cache (K, V transposed) with two matmuls:
    llama.cpp's own numerics (the torch path with q, k, v and the softmax weights rounded to fp16 from there
    on gives the same logits); the copy follows the torch path's writes (prompts, a rewind) and the graphs'."""
    from hybrimoe.models import ggml_decode, ggml_kv

    monkeypatch.setattr(ggml_kv, "MATMUL_ATTENTION_FROM", start)
    monkeypatch.setattr(ggml_decode, "KV_CHUNK", 8)
    model = built(family)
    model.ort_decoder._unbind()
    fp32 = decode_logits(model, False)
    f16_cache_attention(monkeypatch, start)
    want, got = decode_logits(model, False), decode_logits(model, True)
    assert model.ort_decoder.bound.mirror is not None
    assert rel(got, want) <= 1e-5 < rel(want, fp32)  # llama.cpp's rounding, not the fp32 cache's
    assert rel(cache_roundtrip(model, True), cache_roundtrip(model, False)) <= 1e-5
    assert rel(rewritten(model, True), rewritten(model, False)) <= 1e-5
    assert rel(regrown(model, True), regrown(model, False)) <= 1e-5


def regrown(model, graph: bool) -> torch.Tensor:
    """Logits of decode tokens past 24 cached rows, a rewind to 10 (a shorter graph writes the row) and decode
    tokens past 24 rows again (reading that row)."""
    decoder, model.ort_decoder = model.ort_decoder, (model.ort_decoder if graph else None)
    try:
        kv = model.new_kv_cache(32)
        out = [model(torch.tensor(PROMPT[:4]), 0, kv)]
        out += [model(torch.tensor([(3 * p + 1) % 256]), p, kv) for p in range(4, 18)]
        out += [model(torch.tensor([(5 * p + 2) % 256]), p, kv) for p in range(10, 20)]
        return torch.cat(out)
    finally:
        model.ort_decoder = decoder


def rewritten(model, graph: bool) -> torch.Tensor:
    """Logits of a prompt, decode tokens, a prompt chunk that rewinds and rewrites two rows the decode tokens
    attended to, and decode tokens that must read those rows anew."""
    decoder, model.ort_decoder = model.ort_decoder, (model.ort_decoder if graph else None)
    try:
        kv = model.new_kv_cache(32)
        out = [model(torch.tensor(PROMPT[:4]), 0, kv)]
        out += [model(torch.tensor([t]), 4 + i, kv) for i, t in enumerate([3, 7, 11])]  # rows 4, 5, 6
        out.append(model(torch.tensor([21, 22]), 2, kv))                                # rows 2, 3 again
        out += [model(torch.tensor([t]), 4 + i, kv) for i, t in enumerate([5, 6])]
        return torch.cat(out)
    finally:
        model.ort_decoder = decoder
