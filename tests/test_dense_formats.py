"""Dense linears in int8/int4 (`--dense-dtype`, `--lm-head-dtype`; hybrimoe.models.quant_linear).

- QuantLinear computes x @ Q(W)^T + b, Q = the experts' quantise-dequantise (fake_quantize), with the
  fused CPU kernel up to the token-count crossover and dequantise + F.linear above it.
- Tiny checkpoints of every family, experts in fp32: an int8 lm_head alone keeps the logits within 1%
  of the fp32 model and its greedy tokens. With the whole dense part in int8 (or int4) the logits and
  greedy tokens are those of the fp32 model whose dense weights were replaced by their int8 (int4)
  quantise-dequantise image (to 1e-4), so the error is the rounding's own. On these random 64-wide
  models that error exceeds 1% even for int8 (1.2-4.7%: each projection alone adds ~1%, see
  benchmarks/RESULTS_formats.md), and some greedy tokens differ from fp32's; the test pins the
  engine's part of the error, which is none.
- every placement preset gives the plain engine's tokens with quantised dense weights, in each format.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrimoe.config import ModelConfig
from hybrimoe.errors import ConfigError
from hybrimoe.loader import build_dummy_model, load_model
from hybrimoe.models.quant_linear import QuantLinear, dense_targets, quantize_dense
from hybrimoe.moe import kernels
from hybrimoe.moe.install import install_runtime
from hybrimoe.moe.quant import ExpertFormat, fake_quantize
from hybrimoe.policy.cost import CPU_FUSED_KERNEL_MAX_TOKENS
from hybrimoe.policy.presets import PRESETS
from hybrimoe.runtime_options import RuntimeOptions
from hybrimoe.tiny import FAMILIES, tiny_config
from dense_helpers import count_quantised, fake_dense_fp32
from test_format_parity import COSTS, PARITY_FAMILIES, PROMPTS, rel, run
from gguf_fixtures import tiny_gguf  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


# -- one linear ----------------------------------------------------------------------------------------------
def reference(linear: nn.Linear, fmt: ExpertFormat, x: torch.Tensor) -> torch.Tensor:
    """x @ Q(W)^T + b in fp32, Q the plain quantise-dequantise."""
    return F.linear(x.float(), fake_quantize(linear.weight.detach().float(), fmt), linear.bias.detach().float())


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("n,k", [(96, 64), (64, 48), (256, 512)])  # 48: int4 group 48 (no CPU kernel)
def test_quant_linear_matches_the_plain_quantisation_at_every_token_count(name: str, n: int, k: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=True)
    fmt = ExpertFormat(name, torch.float32, 32)
    q = QuantLinear.from_linear(linear, fmt)
    for t in (1, 3, CPU_FUSED_KERNEL_MAX_TOKENS[name] + 5):
        x = torch.randn(2, t, k)  # leading dims are kept
        y = q(x)
        assert y.shape == (2, t, n)
        assert rel(y, reference(linear, fmt, x)) <= 1e-5, (name, n, k, t)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quant_linear_uses_the_fused_kernel_up_to_the_crossover_only(name: str, monkeypatch) -> None:
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(128, 64, bias=False), ExpertFormat(name, torch.float32, 32))
    calls = []
    view = type(q.view())
    original = view.dequantize
    monkeypatch.setattr(view, "dequantize", lambda self: calls.append(1) or original(self))
    limit = CPU_FUSED_KERNEL_MAX_TOKENS[name]
    q(torch.randn(limit, 128))
    assert calls == []  # the fused kernel: no dequantisation
    q(torch.randn(limit + 1, 128))
    assert calls == [1]
    kernels.set_fused_kernels(False)
    try:
        q(torch.randn(1, 128))
    finally:
        kernels.set_fused_kernels(True)
    assert calls == [1, 1]


def test_bf16_quant_linear_and_bad_formats() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    for name in ("int8", "int4"):
        fmt = ExpertFormat(name, torch.bfloat16, 32)
        q = QuantLinear.from_linear(linear, fmt)
        x = torch.randn(1, 256).to(torch.bfloat16)
        assert q(x).dtype == torch.bfloat16
        assert rel(q(x).float(), F.linear(x.float(), fake_quantize(linear.weight.float(), fmt))) <= 0.02
    model = build_dummy_model(ModelConfig.from_dict(tiny_config("mixtral", 256, [0], layers=2, hidden=64).to_dict()))
    with pytest.raises(ConfigError, match="unknown dense dtype 'int3'"):
        quantize_dense(model, "int3")
    with pytest.raises(ConfigError, match="unknown lm_head dtype 'bf16'"):
        quantize_dense(model, None, "bf16")


# -- tiny checkpoints of every family --------------------------------------------------------------------------
def same_rounding(model, reimpl, ref, prompt: list[int]) -> tuple[float, float]:
    """Asserts `model` computes the fp32 re-implementation's logits (1e-4) and greedy tokens; returns
    (model's error vs the fp32 reference, the re-implementation's)."""
    tokens, logits = run(model, prompt)
    want_tokens, want = run(reimpl, prompt)
    _, ref_logits = run(ref, prompt, 0)
    assert rel(logits, want) <= 1e-4, rel(logits, want)
    assert tokens == want_tokens
    return rel(logits, ref_logits), rel(want, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_and_int4_dense_weights_on_every_family(family: str, tiny_checkpoint) -> None:
    path = tiny_checkpoint(family)
    ref = load_model(path, "fp32", progress=False)
    head8 = load_model(path, "fp32", progress=False, lm_head_dtype="int8")
    int8 = load_model(path, "fp32", progress=False, dense_dtype="int8", lm_head_dtype="int8")
    int4 = load_model(path, "fp32", progress=False, dense_dtype="int4")
    fq8 = fake_dense_fp32(path, ExpertFormat("int8", torch.float32), lm_head=True)
    fq4 = fake_dense_fp32(path, ExpertFormat("int4", torch.float32), lm_head=False)
    targets = len(dense_targets(ref))
    assert count_quantised(int8) == targets + 1 and count_quantised(int4) == targets > 0
    assert count_quantised(head8) == 1
    for kept in ("shared_expert_gate", "kv_b_proj"):  # gates and MLA's absorbed weight stay float
        assert all(type(m) is nn.Linear for n, m in int4.named_modules() if n.endswith(kept))
    for prompt in PROMPTS:
        ref_tokens, ref_logits = run(ref, prompt)
        tokens, logits = run(head8, prompt)  # an int8 lm_head alone: within the experts' 1% bound
        assert rel(logits, ref_logits) <= 0.01 and tokens == ref_tokens, (family, rel(logits, ref_logits))
        for model, reimpl in ((int8, fq8), (int4, fq4)):  # whole dense part: the rounding's own error
            err, err_reimpl = same_rounding(model, reimpl, ref, prompt)
            assert 0 < err <= 1.01 * err_reimpl + 1e-5, (family, err, err_reimpl)


# -- placement parity ------------------------------------------------------------------------------------------
@cache
def dummy(family: str, fmt: str):
    top_k = 3 if family.startswith("deepseek") else 2
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=top_k, hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype=fmt, dense_dtype=fmt, lm_head_dtype=fmt)


@cache
def plain(family: str, fmt: str) -> tuple[list[int], torch.Tensor]:
    return run(dummy(family, fmt), PROMPTS[0], 4)


@pytest.mark.parametrize("family,fmt,policy", list(itertools.product(PARITY_FAMILIES, ("int8", "int4"), PRESETS)))
def test_every_policy_gives_the_plain_engines_tokens_with_quantised_dense_weights(family, fmt, policy) -> None:
    model = dummy(family, fmt)
    assert dense_targets(model) == [] and isinstance(model.lm_head, QuantLinear)  # every target swapped
    want_tokens, want_logits = plain(family, fmt)
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=0.25, cpu_threads=1), costs=COSTS)
    try:
        tokens, logits = run(model, PROMPTS[0], 4)
    finally:
        runtime.close()
    assert tokens == want_tokens
    assert (logits - want_logits).abs().max() <= 1e-4


def test_generate_cli_with_int8_dense_weights_gives_the_fp32_tokens(tiny_checkpoint, capsys) -> None:
    import json

    from hybrimoe.cli import main

    path = str(tiny_checkpoint("mixtral"))
    outs = []
    for flags in ([], ["--dense-dtype", "int8", "--lm-head-dtype", "int8"],
                  ["--dense-dtype", "int4", "--expert-dtype", "int4", "--policy", "hybrimoe", "--cpu-threads", "1"]):
        assert main(["generate", "--model", path, "--prompt", "Hello, world.", "--dtype", "fp32", "--json",
                     "--max-new-tokens", "8", "--temperature", "0", *flags]) == 0
        outs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outs[1] == outs[0]
    assert len(outs[2]) == 8
    with pytest.raises(SystemExit) as exc:  # argparse refuses an unknown format
        main(["generate", "--model", path, "--prompt", "x", "--dense-dtype", "bf16"])
    assert exc.value.code == 2


# -- GGUF: Q4_0 dense linears keep their codes -----------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "deepseek-v2"])  # mixtral: q/k rows permuted in the file
def test_gguf_q4_0_dense_linears_keep_their_codes(family: str, tiny_gguf) -> None:
    from gguf import GGMLQuantizationType, GGUFReader

    from hybrimoe.gguf.quantized import linear_name

    g = tiny_gguf(family, "Q4_0")
    floats = load_model(g.path, "fp32", progress=False)  # the file's values, dequantised exactly
    int4 = load_model(g.path, "fp32", progress=False, dense_dtype="int4", lm_head_dtype="int4")
    q4_0 = {linear_name(floats.config, t.name) for t in GGUFReader(str(g.path)).tensors
            if t.tensor_type == GGMLQuantizationType.Q4_0} - {None}
    assert len(q4_0) >= 4
    for name in q4_0:
        module = int4.get_submodule(name)
        assert isinstance(module, QuantLinear) and module.group == 32, name
        # w = (q - 8) * d exactly (fp32 scale, zero = -8 d + 8 d = 0): the same values as the float load
        assert torch.equal(module.dequantized_weight(), floats.get_submodule(name).weight), name
    prompt = PROMPTS[0]
    assert rel(run(int4, prompt, 0)[1], run(floats, prompt, 0)[1]) <= 1e-4  # and the same logits


def test_dequantised_weights_outside_inference_mode_after_a_forward_inside_it() -> None:
    """The per-thread dequantisation workspace is made by a forward (inference mode) and reused outside it."""
    q = QuantLinear.from_linear(nn.Linear(64, 32), ExpertFormat("int4", torch.float32, 32))
    with torch.inference_mode():
        q(torch.randn(CPU_FUSED_KERNEL_MAX_TOKENS["int4"] + 1, 64))  # dequantise path: creates the workspace
    assert q.dequantized_weight().shape == (32, 64)


def test_the_runtime_budget_counts_quantised_dense_weights_at_their_stored_size() -> None:
    from hybrimoe.moe.budget import dense_bytes
    from hybrimoe.moe.install import model_dense_bytes

    config = ModelConfig.from_dict(tiny_config("qwen2-moe", 256, [0], layers=3, experts=8, hidden=64).to_dict())
    float_model = build_dummy_model(config, "fp32", seed=1)
    assert model_dense_bytes(float_model) == dense_bytes(config, torch.float32)  # the config-only estimate
    expert = float_model.expert_store.expert_nbytes
    gpu_memory = dense_bytes(config, torch.float32) + 3 * expert + 5  # 3 slots with fp32 dense weights
    slots = {}
    for name in (None, "int4"):
        model = build_dummy_model(config, "fp32", seed=1, dense_dtype=name, lm_head_dtype=name)
        runtime = install_runtime(model, RuntimeOptions(policy="gpu-lru", gpu_memory_bytes=gpu_memory, cpu_threads=1),
                                  costs=COSTS)
        try:
            slots[name] = runtime.stats()["cache"]["slots"]
        finally:
            runtime.close()
        saved = dense_bytes(config, torch.float32) - model_dense_bytes(model)
        assert slots[name] == 3 + saved // expert
    assert slots["int4"] > slots[None] == 3

