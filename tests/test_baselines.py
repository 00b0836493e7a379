"""Baselines as their users run them: llama.cpp's --n-cpu-moe placement and op offload,
kTransformers' CUDA-graph decode, Fiddler's per-miss choice; the CPU-rate sensitivity knob."""

from __future__ import annotations

import dataclasses

import pytest

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.pipeline import LayerView
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.presets import (
    LLAMACPP_OP_OFFLOAD_MIN_TOKENS,
    PRESETS,
    get_preset,
    initial_content,
    llamacpp_placement,
)
from hybrimoe.policy.schedule import get_scheduler
from hybrimoe.policy.shape import ModelShape
from hybrimoe.sim.costs import ProfileCosts, UniformCosts
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from test_prefetch import _Shape, _trace


def test_llamacpp_puts_the_experts_of_the_last_layers_on_the_gpu():
    """-ngl 99 --n-cpu-moe N keeps the experts of layers 0..N-1 on the CPU (common/arg.cpp), so the
    GPU holds the LAST layers that fit; N is the first GPU layer's index."""
    mixtral = list(range(32))
    assert llamacpp_placement(mixtral, 8, 64) == (24, list(range(24, 32)))  # 25% of 256 experts: 8 layers
    assert llamacpp_placement(mixtral, 8, 71) == (24, list(range(24, 32)))  # whole layers only
    assert llamacpp_placement(mixtral, 8, 256) == (0, mixtral)  # everything fits: --n-cpu-moe 0
    assert llamacpp_placement(mixtral, 8, 7) == (32, [])  # nothing fits: every layer's experts on the CPU
    deepseek = list(range(1, 27))  # DeepSeek-V2-Lite: layer 0 is dense
    assert llamacpp_placement(deepseek, 64, 5 * 64) == (22, [22, 23, 24, 25, 26])
    keys, capacity, per_layer = initial_content(get_preset("llamacpp"), mixtral, 8, 71, {})
    assert capacity == 64 and keys == [(layer, e) for layer in range(24, 32) for e in range(8)] and per_layer is None
    # per-layer budgets (2 experts per layer) cannot hold a whole layer: their total is the budget
    keys, capacity, per_layer = initial_content(get_preset("llamacpp"), mixtral, 8, 71, {}, {l: 2 for l in mixtral})
    assert capacity == 64 and keys[0] == (24, 0) and per_layer is None


def _run(preset, prompt: int, ratio: float = 0.5, costs=None, decode: int | None = 4):
    trace = _trace(3)
    costs = costs or UniformCosts(LinearCosts(cpu_per_token=0.3, gpu_fixed=0.1, copy_seconds=0.4),
                                  dense_seconds=0.5, lm_head_seconds=0.2, expert_bytes=1000)
    sim = Simulator(_Shape(), costs, SimConfig(get_preset(preset) if isinstance(preset, str) else preset, ratio))
    return sim.run(trace, build_workload(trace, prompt, decode)), sim


def test_llamacpp_simulated_cache_holds_the_last_layers():
    captured = {}
    result, sim = _run("llamacpp", 8)
    original = sim._new_cache
    sim._new_cache = lambda t: captured.setdefault("cache", original(t))
    sim.run(_trace(3), build_workload(_trace(3), 8, 4))
    cache = captured["cache"]
    assert {key[0] for key in cache.resident()} == {2, 3}  # 50% of 4 layers x 8 experts: layers 2, 3
    assert cache.capacity == 16 and result.bytes_copied == 0  # a 8-token prompt: no op offload


def test_llamacpp_op_offload_from_32_tokens():
    """ggml-cuda's offload_op: a MUL_MAT_ID whose weights are in host memory runs on the GPU (weights
    copied) when its batch has >= 32 tokens; below, on the CPU. --no-op-offload: always the CPU."""
    assert LLAMACPP_OP_OFFLOAD_MIN_TOKENS == 32
    below, _ = _run("llamacpp", 31)
    at, _ = _run("llamacpp", 32)
    off, _ = _run("llamacpp-no-op-offload", 32)
    assert below.bytes_copied == 0 and off.bytes_copied == 0  # decode never copies either
    assert at.bytes_copied > 0 and at.link_busy > 0
    assert at.prefill_hit_rate == off.prefill_hit_rate  # same placement, only where CPU layers run
    assert at.ttft_seconds < off.ttft_seconds  # copying 0.4 s beats 0.3 s per token on the CPU here
    assert at.tbt_seconds == pytest.approx(off.tbt_seconds)  # decode (1 token) is the same


def test_runtime_places_llamacpp_like_the_simulator_and_offloads_from_32_tokens():
    from hybrimoe.moe.install import install_runtime
    from hybrimoe.runtime_options import RuntimeOptions
    from test_runtime import COSTS, tiny

    model = tiny()
    runtime = install_runtime(model, RuntimeOptions(policy="llamacpp", cache_ratio=0.5, cpu_threads=1), costs=COSTS)
    try:
        moe = sorted(model.config.moe_layers)
        resident = runtime.cache.state.resident()
        per_layer = len(moe) * model.config.num_experts // 2 // model.config.num_experts
        assert {key[0] for key in resident} == set(moe[len(moe) - per_layer:])
        assert len(resident) == per_layer * model.config.num_experts
        layer = moe[0]  # on the CPU
        counts = {0: 20, 1: 12}
        assert runtime.plan_layer(layer, counts, LayerView(set(), {}, 0.0), tokens=16, now=0.0).cpu_order == (1, 0)
        assert runtime.plan_layer(layer, counts, LayerView(set(), {}, 0.0), tokens=32, now=0.0).copies == (0, 1)  # op offload
        assert runtime.plan_layer(layer, {0: 1}, LayerView(set(), {}, 0.0), tokens=1, now=0.0).copies == ()
    finally:
        runtime.close()


def test_only_ktransformers_decodes_under_cuda_graphs():
    """kTransformers' local_chat and server default to use_cuda_graph=True (decode); our runtime is eager,
    and so are the presets that stand for it or for eager Python baselines."""
    assert {name for name, p in PRESETS.items() if p.cuda_graphs} == {"ktransformers"}


def test_graph_costs_replace_exactly_the_launch_overheads():
    shape = ModelShape.named("qwen3.6-35b-a3b")
    model = CostModel.load("paper-a6000")
    eager, graph = ProfileCosts(model, shape), ProfileCosts(model, shape).with_cuda_graphs()
    layer = shape.moe_layers[0]
    assert eager.dense(layer, 1, 100) - graph.dense(layer, 1, 100) == pytest.approx(75e-6 - 15e-6)
    assert eager.experts(layer).gpu(1) - graph.experts(layer).gpu(1) == pytest.approx(30e-6 - 5e-6)
    assert eager.experts(layer).cpu(1, True) == graph.experts(layer).cpu(1, True)
    assert eager.experts(layer).copy() == graph.experts(layer).copy()
    # a profile without graph overheads (e.g. calibrated on an eager runtime) prices graph launches at 0
    d = model.to_dict()
    del d["params"]["gpu_graph_kernel_overhead"], d["params"]["gpu_graph_layer_overhead"]
    bare = CostModel.from_dict(d).with_cuda_graphs()
    assert bare.gpu_kernel_overhead == 0 and bare.gpu_layer_overhead == 0


def test_cpu_rate_scale_makes_every_cpu_expert_that_much_slower():
    model = CostModel.load("paper-a6000")
    shape = ModelShape.named("mixtral-8x7b")
    slow = model.with_cpu_rate_scale(2.47)
    for tokens in (1, 7, 512):
        for first in (False, True):
            assert slow.expert_costs(shape).cpu(tokens, first) == pytest.approx(
                2.47 * model.expert_costs(shape).cpu(tokens, first))
    assert slow.expert_costs(shape).gpu(5) == model.expert_costs(shape).gpu(5)
    with pytest.raises(ConfigError, match="must be > 0"):
        model.with_cpu_rate_scale(0)


@pytest.mark.parametrize("copy, on_cpu", [(3.0, (6,)), (5.5, (6, 5))])
def test_fiddler_copies_a_miss_only_when_copy_plus_gpu_beats_the_cpu(copy, on_cpu):
    """Uncached 5 (3 tokens) and 6 (2 tokens); cpu = 2 s/token, gpu = 1 s. Copy 3: 3 + 1 < 6, so 5 is
    copied, 6 not (4 >= 4). Copy 5.5: neither (6.5 >= 6); the CPU runs the less loaded first."""
    costs = LinearCosts(cpu_per_token=2.0, gpu_fixed=1.0, copy_seconds=copy)
    plan = get_scheduler("fiddler-prefill").plan(0, {5: 3, 6: 2, 1: 4}, {1}, costs)
    assert plan.cpu_order == on_cpu
    assert set(plan.copies) == {5, 6} - set(on_cpu)


def test_ktransformers_eager_and_graph_decode_differ_only_in_launch_costs():
    eager = dataclasses.replace(get_preset("ktransformers"), cuda_graphs=False)
    shape = ModelShape.named("qwen1.5-moe-a2.7b")
    from hybrimoe.data import packaged_traces
    from hybrimoe.trace.format import RoutingTrace

    trace = RoutingTrace.load(packaged_traces(shape.name, "eval")[0].path)
    costs = ProfileCosts(CostModel.load("paper-a6000"), shape)
    w = build_workload(trace, 32, 8)
    g = Simulator(shape, costs, SimConfig(get_preset("ktransformers"), 0.25)).run(trace, w)
    e = Simulator(shape, costs, SimConfig(eager, 0.25)).run(trace, w)
    assert g.ttft_seconds == e.ttft_seconds  # prefill is eager in both
    assert g.decode_hit_rate == e.decode_hit_rate and g.bytes_copied == e.bytes_copied
    assert g.tbt_seconds < e.tbt_seconds


def test_simulate_cli_applies_the_cpu_rate_scale(capsys):
    import json

    from hybrimoe.cli import main
    from hybrimoe.data import packaged_traces

    trace = str(packaged_traces("qwen1.5-moe-a2.7b", "eval")[0].path)
    rows = {}
    for scale in ("1", "2.47"):
        assert main(["simulate", "--trace", trace, "--policy", "ktransformers", "--prompt-tokens", "8",
                     "--max-decode", "3", "--cpu-rate-scale", scale, "--json"]) == 0
        rows[scale] = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")][0]
    assert rows["2.47"]["profile"] == "paper-a6000, CPU rate /2.47" and rows["1"]["profile"] == "paper-a6000"
    assert rows["2.47"]["tbt_seconds"] > rows["1"]["tbt_seconds"]  # its decode misses run on the CPU
