"""Quantised experts on tiny checkpoints of every family, against the fp32 reference.

- int8: logits within 1% (max |dlogit| / max |logit|) of the fp32 model, identical greedy tokens. The
  logits are compared at the prompt positions before the first routing difference: where a router's
  top-k is a near tie (tiny random models have them) int8 rounding can flip it, and the flipped
  token's logits (and later ones, through attention) differ by the other expert, not by rounding.
  DeepSeek-V3's tiny model scales routed experts by 2.5 and amplifies any expert error (bf16 experts
  give 0.5-0.6% there): its bound is 1.5%.
- int4: the engine's int4 logits equal those of a plain fp32 re-implementation of the same rounding
  (every expert weight replaced by its quantise-dequantise image, run in the fp32 model) to 1e-4
  relative, so their distance to the fp32 reference is the quantisation's own (both are asserted).
- every placement preset gives the plain engine's tokens (and logits within 1e-4) in each format.
Measured errors are listed in benchmarks/RESULTS_formats.md.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.loader import build_dummy_model, load_model
from hybrimoe.moe.install import install_runtime
from hybrimoe.moe.quant import ExpertFormat, fake_quantize
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.presets import PRESETS
from hybrimoe.runtime_options import RuntimeOptions
from hybrimoe.tiny import FAMILIES, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

PROMPTS = ([5, 17, 42, 9, 77, 3, 120, 64], [1, 2, 3, 4, 200, 150, 99])
NEW_TOKENS = 6
COSTS = LinearCosts(cpu_per_token=2e-5, gpu_fixed=3e-5, copy_seconds=6e-5, cpu_fixed=2e-5, cpu_first_extra=1e-5)




def run(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], torch.Tensor]:
    """Greedy decode; returns (new tokens, prefill logits [T, V])."""
    kv = model.new_kv_cache(len(prompt) + new_tokens + 1)
    logits = model(torch.tensor(prompt), 0, kv)
    prefill, last, tokens, pos = logits, logits[-1], [], len(prompt)
    for _ in range(new_tokens):
        tokens.append(int(torch.argmax(last)))
        last = model(torch.tensor([tokens[-1]]), pos, kv)[-1]
        pos += 1
    return tokens, prefill


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def fake_quantized_fp32(path, fmt: ExpertFormat):
    """The plain fp32 re-implementation: the fp32 model with every expert weight quantised and dequantised."""
    model = load_model(path, "fp32", progress=False)
    store = model.expert_store
    for layer in store.layers:
        for e in range(store.config.num_experts):
            w = store.weights(layer, e)
            for part in (w.gate, w.up, w.down):
                part.copy_(fake_quantize(part, fmt))
    return model


def routing(model, prompt: list[int]) -> dict[int, torch.Tensor]:
    """layer -> sorted expert ids [T, K] of the prompt's prefill."""
    seen: dict[int, torch.Tensor] = {}
    model.routing_observer = lambda layer, r: seen.__setitem__(layer, r.expert_ids.sort(dim=-1).values.clone())
    try:
        run(model, prompt, 0)
    finally:
        model.routing_observer = None
    return seen


def first_routing_difference(a, b, prompt: list[int]) -> int:
    """The first prompt position whose routed experts differ between models a and b in any layer (T if none)."""
    ra, rb = routing(a, prompt), routing(b, prompt)
    differs = torch.zeros(len(prompt), dtype=torch.bool)
    for layer in ra:
        differs |= (ra[layer] != rb[layer]).any(dim=-1)
    return int(differs.nonzero()[0, 0]) if differs.any() else len(prompt)


INT8_BOUND = {"deepseek-v3": 0.015}  # see the module docstring; 0.01 otherwise


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_and_int4_logits_and_tokens_on_every_family(family: str, tiny_checkpoint) -> None:
    path = tiny_checkpoint(family)
    ref = load_model(path, "fp32", progress=False)
    int8 = load_model(path, "fp32", progress=False, expert_dtype="int8")
    int4 = load_model(path, "fp32", progress=False, expert_dtype="int4")
    fq4 = fake_quantized_fp32(path, ExpertFormat("int4", torch.float32))
    compared = 0
    for prompt in PROMPTS:
        ref_tokens, ref_logits = run(ref, prompt)
        tokens8, logits8 = run(int8, prompt)
        agree = first_routing_difference(ref, int8, prompt)
        compared += agree
        err = rel(logits8[:agree], ref_logits[:agree]) if agree else 0.0
        assert err <= INT8_BOUND.get(family, 0.01), (family, prompt, err)
        assert tokens8 == ref_tokens, family
        _, logits4 = run(int4, prompt, 0)
        _, logits_fq = run(fq4, prompt, 0)
        assert rel(logits4, logits_fq) <= 1e-4, (family, rel(logits4, logits_fq))  # the same rounding, computed by our kernels
        assert rel(logits4, ref_logits) <= 1.01 * rel(logits_fq, ref_logits) + 1e-5
    assert compared >= len(PROMPTS[0]), f"{family}: routing flips left too few positions to compare"


# -- placement parity in each format -------------------------------------------------------------------------
PARITY_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v2", "deepseek-v3")
FORMATS = ("bf16", "int8", "int4")


@cache
def dummy(family: str, fmt: str):
    top_k = 3 if family.startswith("deepseek") else 2
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=top_k, hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=1, std=0.1, expert_dtype=fmt)


@cache
def plain(family: str, fmt: str) -> tuple[list[int], torch.Tensor]:
    return run(dummy(family, fmt), PROMPTS[0], 4)


@pytest.mark.parametrize("family,fmt,policy,ratio,per_layer",
                         [(f, fmt, p, r, s) for f, fmt, p, (r, s) in
                          itertools.product(PARITY_FAMILIES, FORMATS, PRESETS, ((0.25, False), (0.5, True)))])
def test_every_policy_gives_the_plain_engines_tokens_in_each_format(family, fmt, policy, ratio, per_layer) -> None:
    model = dummy(family, fmt)
    want_tokens, want_logits = plain(family, fmt)
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=ratio, per_layer_cache=per_layer,
                                                    cpu_threads=1), costs=COSTS)
    try:
        tokens, logits = run(model, PROMPTS[0], 4)
        stats = runtime.stats()
    finally:
        runtime.close()
    assert tokens == want_tokens
    assert (logits - want_logits).abs().max() <= 1e-4
    if policy == "hybrimoe" and not per_layer:  # the run used cache slots of the format's size
        assert stats["cache"]["capacity_bytes"] == stats["cache"]["slots"] * model.expert_store.expert_nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the cache computes from copied "
                    "int8/int4 bytes by dequantising on the GPU")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("policy,ratio", [("hybrimoe", 0.25), ("gpu-lru", 0.5), ("resident", 1.0)])
def test_cuda_computes_from_the_copied_quantised_bytes(fmt: str, policy: str, ratio: float) -> None:
    import copy

    from hybrimoe.moe.install import pin_store

    want_tokens, want_logits = plain("deepseek-v2", fmt)
    model = copy.deepcopy(dummy("deepseek-v2", fmt)).to("cuda")
    pin_store(model.expert_store)
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=ratio, cpu_threads=2), costs=COSTS)
    try:
        kv = model.new_kv_cache(len(PROMPTS[0]) + 5)
        logits = model(torch.tensor(PROMPTS[0], device="cuda"), 0, kv)
        stats = runtime.stats()
    finally:
        runtime.close()
    assert (logits.cpu() - want_logits).abs().max() <= 1e-3 * want_logits.abs().max()
    assert stats["cache"]["bytes_copied"] % model.expert_store.expert_nbytes == 0


def test_generate_cli_with_int8_experts_gives_the_fp32_tokens(tiny_checkpoint, capsys) -> None:
    import json

    from hybrimoe.cli import main

    path = str(tiny_checkpoint("qwen3-moe"))
    outs = []
    for flags in ([], ["--expert-dtype", "int8"], ["--expert-dtype", "int4", "--int4-group", "64", "--policy", "hybrimoe",
                                                   "--cpu-threads", "1"]):
        assert main(["generate", "--model", path, "--prompt", "Hello, world.", "--dtype", "fp32", "--json",
                     "--max-new-tokens", "8", "--temperature", "0", *flags]) == 0
        outs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outs[1] == outs[0]
    assert len(outs[2]) == 8  # int4 through the hybrid runtime runs (its tokens may differ: 4-bit rounding)
    with pytest.raises(SystemExit) as exc:  # argparse refuses an unknown format
        main(["generate", "--model", path, "--prompt", "x", "--expert-dtype", "int3"])
    assert exc.value.code == 2
    assert main(["generate", "--model", path, "--prompt", "x", "--expert-dtype", "int4", "--int4-group", "48"]) == 2
