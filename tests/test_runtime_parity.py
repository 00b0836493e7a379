"""Placement never changes what is computed: every family x policy x cache ratio x cache scope gives the
same greedy tokens as the plain reference (ReferenceExecutor) and logits within 1e-4 (fp32).

The full product: 6 families x 10 presets x 4 cache ratios x 2 scopes (global, per layer) = 480 runs
(about half a minute on 2 cores).
Models are tiny random ones (std 0.1 so routing and argmax are decisive); top-k 3 for the DeepSeek
models so that at least three experts per token are summed (CPU and GPU partial sums in another order).
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.loader import build_dummy_model
from hybrimoe.moe.install import install_runtime
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.presets import PRESETS
from hybrimoe.runtime_options import RuntimeOptions
from hybrimoe.tiny import tiny_config

FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v2", "deepseek-v3")
POLICIES = tuple(PRESETS)
RATIOS = (0.0, 0.25, 0.5, 1.0)
PROMPT = [5, 17, 42, 9, 77, 3, 120, 64]  # prefill of 8 tokens
NEW_TOKENS = 4  # greedy decode steps
# Costs that make the hybrid scheduler split layers between CPU, GPU and copies (seconds).
COSTS = LinearCosts(cpu_per_token=2e-5, gpu_fixed=3e-5, copy_seconds=6e-5, cpu_fixed=2e-5, cpu_first_extra=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@cache
def model_for(family: str):
    top_k = 3 if family.startswith("deepseek") else 2
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=8, top_k=top_k, hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=1, std=0.1)


def greedy(model, device: str = "cpu") -> tuple[list[int], list[torch.Tensor]]:
    """Prefill PROMPT, then NEW_TOKENS greedy decode steps; returns (tokens, logits of every step)."""
    kv = model.new_kv_cache(len(PROMPT) + NEW_TOKENS + 1)
    logits = model(torch.tensor(PROMPT, device=device), 0, kv)[-1]
    tokens, steps, pos = [], [logits], len(PROMPT)
    for _ in range(NEW_TOKENS):
        token = int(torch.argmax(logits))
        tokens.append(token)
        logits = model(torch.tensor([token], device=device), pos, kv)[-1]
        steps.append(logits)
        pos += 1
    return tokens, steps


@cache
def reference(family: str) -> tuple[list[int], list[torch.Tensor]]:
    return greedy(model_for(family))


def check_parity(family: str, policy: str, ratio: float, per_layer: bool) -> dict:
    model = model_for(family)
    ref_tokens, ref_logits = reference(family)
    options = RuntimeOptions(policy=policy, cache_ratio=ratio, per_layer_cache=per_layer, cpu_threads=1)
    runtime = install_runtime(model, options, costs=COSTS)
    try:
        tokens, logits = greedy(model)
        stats = runtime.stats()
    finally:
        runtime.close()
    assert tokens == ref_tokens, (family, policy, ratio, per_layer)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = (a - b).abs().max().item()
        assert err <= 1e-4, f"{family} {policy} ratio {ratio} per_layer {per_layer}: step {step} max |dlogit| {err}"
    cache = stats["cache"]
    assert cache["resident"] <= cache["slots"]
    return stats


MATRIX = list(itertools.product(FAMILIES, POLICIES, RATIOS, (False, True)))


@pytest.mark.parametrize("family,policy,ratio,per_layer", MATRIX)
def test_every_family_policy_ratio_scope(family: str, policy: str, ratio: float, per_layer: bool) -> None:
    stats = check_parity(family, policy, ratio, per_layer)
    if policy == "resident":
        assert stats["cache"]["misses"] == 0  # every expert is on the device from the start
    if ratio == 0.0 and policy != "resident":
        assert stats["cache"]["hits"] == 0 and stats["cache"]["resident"] == 0


def test_the_matrix_exercises_cpu_gpu_copies_and_staging() -> None:
    """The parity tests above are only meaningful if the runs actually split work: check one run of
    each kind moves experts through every path."""
    hybrid = check_parity("deepseek-v2", "hybrimoe", 0.25, False)
    busy = hybrid["busy_seconds"]
    assert busy["cpu"] > 0 and busy["gpu"] > 0 and busy["copy"] > 0
    assert hybrid["cache"]["inserts"] > 0
    staged = check_parity("deepseek-v2", "gpu-lru", 0.0, False)
    assert staged["cache"]["staged"] > 0 and staged["busy_seconds"]["cpu"] == 0.0


def test_prefetch_and_fill_copies_keep_parity_and_happen() -> None:
    prefetch = check_parity("deepseek-v2", "hybrimoe-prefetch-only", 0.25, False)
    assert prefetch["extra_copies"]["prefetch"] > 0 and "gates" in prefetch["prefetch"]
    fill = check_parity("deepseek-v2", "hybrimoe-cache-only", 0.5, True)
    assert fill["extra_copies"]["fill_misses"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs the copy stream, events, "
                    "pinned store and CUDA timers for real)")
@pytest.mark.parametrize("policy,ratio", [("hybrimoe", 0.25), ("hybrimoe", 0.0), ("gpu-lru", 0.0), ("gpu-lru", 0.5),
                                          ("ktransformers", 0.25), ("hybrimoe-cache-only", 0.5), ("resident", 1.0)])
def test_cuda_matches_the_cpu_reference(policy: str, ratio: float) -> None:
    import copy

    from hybrimoe.moe.install import pin_store

    ref_tokens, ref_logits = reference("deepseek-v2")
    model = copy.deepcopy(model_for("deepseek-v2")).to("cuda")
    pin_store(model.expert_store)
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=ratio, cpu_threads=2), costs=COSTS)
    try:
        tokens, logits = greedy(model, "cuda")
        stats = runtime.stats()
    finally:
        runtime.close()
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        assert (a.cpu() - b).abs().max().item() <= 1e-4
    assert stats["device"].startswith("cuda") and stats["busy_seconds"]["gpu"] > 0

