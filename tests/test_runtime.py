"""Hybrid runtime mechanics on the CPU fallback: weight indexing of CPU experts, cache budget and
counters, budget errors, the CPU worker's thread count, static caches, trace replay, options and flags."""

from __future__ import annotations

import argparse
import threading
from functools import cache

import pytest
import torch

from hybrimoe.cli.runtime_args import (
    add_runtime_arguments,
    runtime_kwargs_from_args,
    runtime_options_from_args,
)
from hybrimoe.config import ModelConfig
from hybrimoe.errors import BudgetError, ConfigError
from hybrimoe.loader import build_dummy_model
from hybrimoe.moe.budget import dense_bytes, plan_budget
from hybrimoe.moe.devices import Devices
from hybrimoe.moe.install import check_budget_before_load, install_runtime
from hybrimoe.moe.layer import ReferenceExecutor
from hybrimoe.moe.runtime import CpuWorker
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.runtime_options import RuntimeOptions, parse_bytes
from hybrimoe.tiny import tiny_config

COSTS = LinearCosts(cpu_per_token=2e-5, gpu_fixed=3e-5, copy_seconds=6e-5, cpu_fixed=2e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@cache
def tiny(family: str = "qwen3-moe", top_k: int = 4, experts: int = 8):
    config = ModelConfig.from_dict(tiny_config(family, 256, [0], layers=3, experts=experts, top_k=top_k,
                                               hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=2, std=0.1)


def test_cpu_experts_get_the_weight_of_their_own_topk_position() -> None:
    """Experts appear at different top-k positions with distinct weights; fiddler's prefill with an empty
    cache and these costs (CPU cheaper than copy + GPU for <= 3 tokens) runs every expert on the CPU worker. A CPU path that used the position within its own
    sub-list as the position in the token's top-k list (PAPER.md's suspected bug) fails this test."""
    model = tiny()
    layer = model.config.moe_layers[0]
    x = torch.randn(3, model.config.hidden_size)  # [T=3, H]
    ids = torch.tensor([[5, 1, 6, 2], [2, 7, 5, 0], [3, 5, 1, 4]])  # [T, K]: expert 5 at positions 0, 2, 1
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.05, 0.5, 0.25, 0.2], [0.7, 0.1, 0.15, 0.05]])
    expected = ReferenceExecutor(model.expert_store).run(layer, x, ids, w)
    wrong = ReferenceExecutor(model.expert_store).run(layer, x, ids, w.flip(1))
    assert not torch.allclose(expected, wrong, atol=1e-4)  # the check below can tell the weights apart
    for policy, ratio in (("fiddler", 0.0), ("hybrimoe", 0.25), ("gpu-lru", 0.5)):
        runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=ratio, cpu_threads=1), costs=COSTS)
        try:
            got = runtime.executor.run(layer, x, ids, w)
            stats = runtime.stats()
        finally:
            runtime.close()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if policy == "fiddler":
            assert stats["busy_seconds"]["cpu"] > 0 and stats["busy_seconds"]["gpu"] == 0.0


def _run_steps(model, steps: int = 6) -> None:
    kv = model.new_kv_cache(32)
    model(torch.tensor([3, 9, 27, 81, 11, 33]), 0, kv)
    for pos in range(6, 6 + steps):
        model(torch.tensor([pos * 7 % 200]), pos, kv)


@pytest.mark.parametrize("policy,per_layer", [("gpu-lru", False), ("gpu-lru", True), ("hybrimoe", False),
                                              ("hybrimoe", True), ("llamacpp", False)])
def test_cache_within_budget_and_hits_plus_misses_equal_activations(policy: str, per_layer: bool) -> None:
    model = tiny()
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=0.25, per_layer_cache=per_layer,
                                                    cpu_threads=1), costs=COSTS)
    seen = {"activations": 0, "max_resident": 0}
    observer = model.routing_observer

    def count(layer, record):  # distinct experts per layer per forward pass = activations
        observer(layer, record)
        seen["activations"] += int(record.expert_ids.unique().numel())

    model.routing_observer = count
    cache = runtime.cache
    copy_into_slot = cache.copy_into_slot

    def checked_copy(*args, **kwargs):  # every admission into a slot is followed by its copy
        event = copy_into_slot(*args, **kwargs)
        seen["max_resident"] = max(seen["max_resident"], len(cache.state))
        for layer in model.config.moe_layers:
            assert len(cache.cached_experts(layer)) <= cache.state.limit(layer)
        cache.check(full=True)
        return event

    cache.copy_into_slot = checked_copy
    try:
        _run_steps(model)
        stats = runtime.stats()["cache"]
    finally:
        model.routing_observer = observer
        runtime.close()
    slots = round(0.25 * len(model.config.moe_layers) * model.config.num_experts)
    if policy == "llamacpp":  # whole layers only (llama.cpp --n-cpu-moe): the rest of the budget stays unused
        slots -= slots % model.config.num_experts
    assert stats["slots"] == slots and seen["max_resident"] <= slots and stats["resident"] <= slots
    assert seen["max_resident"] > 0 or policy == "llamacpp"  # the checks ran (llama.cpp copies nothing here)
    assert stats["hits"] + stats["misses"] == seen["activations"] > 0
    assert sum(c["hits"] + c["misses"] for c in stats["per_layer"].values()) == seen["activations"]
    assert stats["bytes_copied"] == (stats["inserts"] + stats["staged"]) * model.expert_store.expert_nbytes
    metrics = runtime.metrics()  # stats survive close(); flat floats for Engine.stats()
    assert metrics["runtime_cache_hits"] + metrics["runtime_cache_misses"] == seen["activations"]
    assert all(isinstance(v, float) for v in metrics.values()) and "runtime_busy_copy_seconds" in metrics
    if policy == "gpu-lru":
        assert stats["inserts"] > 0 and stats["evictions"] > 0


def test_static_cache_fills_on_first_use_then_never_changes() -> None:
    model = tiny()
    runtime = install_runtime(model, RuntimeOptions(policy="ktransformers", cache_ratio=0.5, cpu_threads=1),
                              costs=COSTS)
    try:
        kv = model.new_kv_cache(32)
        model(torch.arange(10, 30), 0, kv)  # prefill: gpu-only copies fill the free slots, then freeze
        frozen = runtime.cache.state.resident()
        assert len(frozen) == runtime.cache.num_slots
        for pos in range(20, 26):
            model(torch.tensor([pos]), pos, kv)
        assert runtime.cache.state.resident() == frozen and runtime.cache.state.evictions == 0
    finally:
        runtime.close()


def test_budget_errors_name_the_numbers_before_loading() -> None:
    config = tiny().config
    dense = dense_bytes(config, torch.float32)
    assert dense > 0
    with pytest.raises(BudgetError, match=r"dense part"):
        check_budget_before_load(config, torch.float32, RuntimeOptions(policy="hybrimoe", gpu_memory_bytes=dense // 2))
    expert = config.expert_bytes(4)
    with pytest.raises(BudgetError, match=str(expert)):
        plan_budget(config, torch.float32, RuntimeOptions(expert_cache_bytes=expert - 1))
    with pytest.raises(BudgetError, match="free memory"):
        plan_budget(config, torch.float32, RuntimeOptions(cache_ratio=1.0), device_free_bytes=dense + expert)
    budget = plan_budget(config, torch.float32, RuntimeOptions(gpu_memory_bytes=dense + 3 * expert + 5))
    assert budget.slots == 3
    budget = plan_budget(config, torch.float32, RuntimeOptions(expert_cache_bytes=5 * expert, per_layer_cache=True))
    assert budget.slots == 5 and budget.layer_capacity == {0: 2, 1: 2, 2: 1}  # 3 MoE layers


def test_options_and_flags() -> None:
    assert parse_bytes("12GB") == 12 * 10**9 and parse_bytes("2GiB") == 2 * 1024**3 and parse_bytes(4096) == 4096
    for bad in ("12 parsecs", "-1", "GB"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)
    with pytest.raises(ConfigError, match="known"):
        RuntimeOptions.from_kwargs(policy="nope")
    with pytest.raises(ConfigError, match="at most one"):
        RuntimeOptions(cache_ratio=0.5, expert_cache_bytes=10)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        RuntimeOptions(cache_ratio=1.5)
    with pytest.raises(ConfigError, match="unknown runtime option"):
        RuntimeOptions.from_kwargs(cache_size=3)
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")  # the command's own (engine) flag
    add_runtime_arguments(parser)
    assert runtime_options_from_args(parser.parse_args([])) is None and runtime_kwargs_from_args(parser.parse_args([])) == {}
    args = parser.parse_args(["--policy", "gpu-lru", "--expert-cache", "1.5GiB", "--per-layer-cache",
                              "--cpu-threads", "3", "--dummy-weights", "deepseek-v2-lite"])
    options = runtime_options_from_args(args)
    assert (options.policy, options.expert_cache_bytes, options.per_layer_cache, options.cpu_threads) == \
        ("gpu-lru", int(1.5 * 1024**3), True, 3)
    assert options.dummy_weights == "deepseek-v2-lite" and options.device == "cpu"
    kwargs = runtime_kwargs_from_args(args)
    assert "device" not in kwargs and RuntimeOptions.from_kwargs(device="cpu", **kwargs) == options
    assert runtime_options_from_args(parser.parse_args(["--cache-ratio", "0.5"])).policy == "hybrimoe"
    with pytest.raises(SystemExit):
        parser.parse_args(["--expert-cache", "1GB", "--cache-ratio", "0.5"])


def test_load_with_runtime_checks_the_budget_before_reading_weights(tiny_checkpoint, monkeypatch) -> None:
    from hybrimoe import loader
    from hybrimoe.moe.install import load_with_runtime

    path = tiny_checkpoint("qwen2-moe")
    reference = loader.load_model(path, dtype="fp32", progress=False)
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    expected = reference(ids, 0, reference.new_kv_cache(8))
    model, runtime = load_with_runtime(str(path), "fp32", RuntimeOptions(policy="hybrimoe", cache_ratio=0.5,
                                                                          cpu_threads=1), progress=False)
    try:
        got = model(ids, 0, model.new_kv_cache(8))
    finally:
        runtime.close()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the budget check")

    monkeypatch.setattr(loader, "load_model", no_loading)
    with pytest.raises(BudgetError, match="dense part"):
        load_with_runtime(str(path), "fp32", RuntimeOptions(gpu_memory_bytes=1000), progress=False)


def test_mrs_fed_top_p_pairs_equals_mrs_fed_full_scores() -> None:
    """The runtime hands MRS the p best (expert, score) pairs per token (torch.topk) instead of all E
    scores; the priorities must be exactly those of the full-score update."""
    from hybrimoe.policy.cache_policy import MRSPolicy

    model = tiny()
    runtime = install_runtime(model, RuntimeOptions(policy="hybrimoe", cache_ratio=0.25, cpu_threads=1), costs=COSTS)
    full = MRSPolicy(top_k=model.config.top_k)
    gen = torch.Generator().manual_seed(3)
    try:
        for _ in range(20):
            scores = torch.softmax(torch.randn(3, model.config.num_experts, generator=gen), dim=-1)  # [T, E]
            ids = torch.topk(scores, model.config.top_k, dim=-1).indices
            runtime.set_scores(1, scores)
            runtime.observe_routing(1, ids, torch.ones_like(scores[:, :model.config.top_k]))
            for row, selected in zip(scores.tolist(), ids.tolist()):
                full.observe(1, row, selected)
        policy = runtime.cache.state.policy
        assert [policy.priority(1, e) for e in range(8)] == pytest.approx([full.priority(1, e) for e in range(8)],
                                                                          rel=1e-12, abs=0)
        assert max(full.priority(1, e) for e in range(8)) > 0
    finally:
        runtime.close()


def test_calibration_measures_positive_costs() -> None:
    from hybrimoe.moe.calibrate import calibrate_costs

    model = tiny()
    worker = CpuWorker(threads=1)
    try:
        costs = calibrate_costs(model.expert_store, Devices.create("cpu"), worker, tokens=16, repeats=3)
    finally:
        worker.close()
    assert costs.copy_seconds > 0 and costs.gpu(1) > 0 and costs.cpu(1, False) > 1e-9


def test_a_second_runtime_needs_the_first_closed() -> None:
    model = tiny()
    runtime = install_runtime(model, RuntimeOptions(policy="gpu-lru", cache_ratio=0.25, cpu_threads=1), costs=COSTS)
    try:
        with pytest.raises(ConfigError, match="close"):
            install_runtime(model, RuntimeOptions(policy="hybrimoe", cpu_threads=1), costs=COSTS)
    finally:
        runtime.close()
    assert all(isinstance(b.executor, ReferenceExecutor) for b in model.moe_blocks.values())
    assert model.routing_observer is None and runtime.cache.num_slots == 0  # slots freed at close


def test_a_bad_cost_profile_leaves_no_worker_behind() -> None:
    model = tiny()
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ConfigError, match="cost profile"):
        install_runtime(model, RuntimeOptions(policy="hybrimoe", cpu_threads=1, cost_profile="no-such-profile"))
    assert not any(t.name.startswith("hybrimoe-cpu") for t in threading.enumerate() if t.name not in before)
    assert all(isinstance(b.executor, ReferenceExecutor) for b in model.moe_blocks.values())
