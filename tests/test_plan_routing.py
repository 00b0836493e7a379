"""Synthetic routing fitted to the packaged dev traces, the routing a plan picks, and how rows are priced."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hybrimoe.data import packaged_traces
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.plan.memory import Machine, device_budget, format_memory
from hybrimoe.plan.predict import format_costs, predict
from hybrimoe.plan.routing import choose_routing
from hybrimoe.plan.synthetic import fitted_sources, layer_stats, synthetic_trace, target_fits
from hybrimoe.plan.target import resolve_target
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.presets import get_preset
from hybrimoe.policy.shape import ModelShape
from hybrimoe.sim.costs import ProfileCosts
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from hybrimoe.trace.format import RoutingTrace


def _mean(stats, attr: str) -> float:
    return float(np.mean([getattr(s, attr) for s in stats]))


@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "qwen3.6-35b-a3b"])
def test_synthetic_routing_reproduces_the_fitted_skew_and_reuse(model):
    """Generated with a model's own per-layer fits, the trace's top-quarter share and token-to-token
    reuse match the model's dev traces (fitted) within 0.03, and its eval traces (not fitted) within
    0.03 plus the distance between the dev and the eval traces themselves."""
    shape = ModelShape.named(model)
    gen = layer_stats([synthetic_trace(shape, 400, 0, seed=3, fits=fitted_sources()[model])])
    dev, ev = ([layer_stats([RoutingTrace.load(t.path) for t in packaged_traces(model, role)])
                for role in ("dev", "eval")])
    for attr in ("share", "reuse"):
        assert abs(_mean(gen, attr) - _mean(dev, attr)) < 0.03, (model, attr)
        assert abs(_mean(gen, attr) - _mean(ev, attr)) < 0.03 + abs(_mean(dev, attr) - _mean(ev, attr)), (model, attr)


def test_synthetic_routing_is_skewed_and_reused_beyond_chance():
    shape = ModelShape.named("deepseek-v2-lite")
    fits = target_fits(len(shape.moe_layers))
    assert len(fits) == 26 and all(f.skew > 0 and 0 <= f.excess_reuse < 1 for f in fits)
    trace = synthetic_trace(shape, 300, 20, seed=1)
    assert trace.header.source.startswith("synthetic")
    assert [t.phase for t in trace.tokens].count("prefill") == 300 and len(trace.tokens) == 320
    stats = layer_stats([trace])
    k, e = shape.top_k, shape.num_experts
    assert _mean(stats, "share") > 0.25 + 0.1  # uniform routing gives the top quarter ~25%
    assert _mean(stats, "reuse") > k / e + 0.1  # independent uniform draws reuse k/E
    for tok in trace.tokens[:50]:
        for r in tok.layers.values():
            assert len(set(r.experts)) == k and abs(sum(r.weights) - 1) < 1e-3
    again = synthetic_trace(shape, 300, 20, seed=1)
    assert [t.layers for t in again.tokens] == [t.layers for t in trace.tokens]  # seeded


def test_routing_choice():
    mixtral = choose_routing(ModelShape.named("mixtral-8x7b"), None, 16, 2)
    assert not mixtral.synthetic and "eval" in mixtral.label and mixtral.warmup  # dev traces pick the hot set
    assert all("gsm8k" in w.header.source for w in mixtral.warmup)  # the dev trace, never the eval one
    lite = choose_routing(ModelShape.named("deepseek-v2-lite"), None, 16, 2)
    assert lite.synthetic and "SYNTHETIC" in lite.label


def test_rows_are_priced_eager_at_the_formats_bytes():
    """kTransformers' preset runs eager in hybrimoe (no CUDA graphs), and a format's rows cost its bytes."""
    target = resolve_target("mixtral-8x7b")
    machine = Machine(24 * 10**9, 64 * 10**9, 4096, device="cuda")
    profile = CostModel.load("paper-a6000")
    routing = choose_routing(target.shape, None, 32, 4)
    mem = format_memory(target, ExpertFormat.parse("int4", torch.bfloat16), machine)
    costs = format_costs(profile, target.shape, mem.expert_bytes, "bf16")
    assert costs.gpu_bits == costs.cpu_bits == pytest.approx(8 * mem.expert_bytes / target.shape.expert_params)
    assert costs.dense_bits == 16
    budget = device_budget(target, mem, machine, "ktransformers")
    row = predict(target.shape, routing, budget, costs, 32, 4)

    def run(preset):
        sim = Simulator(target.shape, ProfileCosts(costs, target.shape), SimConfig(preset, budget.ratio),
                        routing.warmup)
        return sim.run(routing.trace, build_workload(routing.trace, 32, 4))

    graphs = get_preset("ktransformers")
    assert row.tbt_seconds == pytest.approx(run(dataclasses.replace(graphs, cuda_graphs=False)).tbt_seconds)
    assert row.tbt_seconds > run(graphs).tbt_seconds  # graph-captured launches would be cheaper
    bf16 = format_memory(target, ExpertFormat.parse("bf16", torch.bfloat16),
                         Machine(24 * 10**9, 256 * 10**9, 4096, device="cuda"))
    slow = format_costs(profile, target.shape, bf16.expert_bytes, "bf16")
    assert slow.copy_time(target.shape.expert_shape(slow.gpu_bits)) > 3 * costs.copy_time(target.shape.expert_shape(costs.gpu_bits))
