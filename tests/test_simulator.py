"""Simulator: determinism, accounting, workload building, a packaged real trace."""

import pytest

from hybrimoe.data import packaged_traces
from hybrimoe.errors import ConfigError
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.presets import PRESETS, get_preset
from hybrimoe.policy.shape import ModelShape
from hybrimoe.sim.costs import ProfileCosts, UniformCosts
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from hybrimoe.trace.format import RoutingTrace
from test_prefetch import _Shape, _trace

COSTS = UniformCosts(LinearCosts(cpu_per_token=0.3, gpu_fixed=0.1, copy_seconds=0.4, cpu_first_extra=0.05),
                     dense_seconds=0.5, lm_head_seconds=0.2, expert_bytes=1000)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_deterministically_and_counts_every_activation(name):
    trace = _trace(3)
    workload = build_workload(trace)
    rows = [Simulator(_Shape(), COSTS, SimConfig(get_preset(name), 0.25)).run(trace, workload).row() for _ in range(2)]
    assert rows[0] == rows[1]
    r = rows[0]
    assert r["ttft_seconds"] > 0 and r["tbt_seconds"] > 0 and r["decode_steps"] == 24
    assert 0.0 <= r["hit_rate"] <= 1.0
    # every copied byte is link time and vice versa: copies x 0.4 s of link per 1000-byte expert
    assert r["link_busy"] * r["total_seconds"] == pytest.approx(0.4 * r["bytes_copied"] / 1000)
    assert 0 <= r["cpu_busy"] <= 1 and 0 <= r["gpu_busy"] <= 1 and 0 <= r["link_busy"] <= 1
    if name == "resident":
        assert r["hit_rate"] == 1.0 and r["bytes_copied"] == 0


def test_hits_and_misses_equal_activations():
    trace = _trace(4)
    workload = build_workload(trace, prompt_tokens=10)
    sim = Simulator(_Shape(), COSTS, SimConfig(get_preset("hybrimoe"), 0.5))
    run_cache = {}
    original = sim._new_cache

    def capture(t):
        run_cache["cache"] = original(t)
        return run_cache["cache"]

    sim._new_cache = capture
    sim.run(trace, workload)
    cache = run_cache["cache"]
    expected = sum(len({e for t in workload.prefill for e in t.layers[l].experts}) for l in range(4))
    expected += 2 * 4 * len(workload.decode)
    assert cache.hits + cache.misses == expected
    assert cache.capacity == 16  # 50% of 4 layers x 8 experts
    assert len(cache) == 16 + cache.inserts - cache.evictions  # preloaded full, then one in per one out


def test_workload_wraps_short_traces_and_says_so():
    trace = _trace(5, tokens=20)
    w = build_workload(trace, prompt_tokens=50)
    assert len(w.prefill) == 50 and w.wrapped and w.notes
    assert not build_workload(trace, prompt_tokens=8).wrapped
    with pytest.raises(ConfigError):
        build_workload(trace, prompt_tokens=0)


def test_cache_ratio_out_of_range_is_a_user_error():
    with pytest.raises(ConfigError, match="cache ratio"):
        Simulator(_Shape(), COSTS, SimConfig(get_preset("hybrimoe"), 1.5))


def test_packaged_trace_with_paper_profile():
    model = "qwen1.5-moe-a2.7b"
    shape = ModelShape.named(model)
    costs = ProfileCosts(CostModel.load("paper-a6000"), shape)
    trace = RoutingTrace.load(packaged_traces(model, "eval")[0].path)
    dev = [RoutingTrace.load(t.path) for t in packaged_traces(model, "dev")]
    workload = build_workload(trace, prompt_tokens=32, max_decode=8)
    result = {n: Simulator(shape, costs, SimConfig(get_preset(n), 0.25), dev).run(trace, workload)
              for n in ("hybrimoe", "ktransformers", "resident")}
    for r in result.values():
        assert r.ttft_seconds > 0 and r.tbt_seconds > 0 and r.decode_steps == 8
    # every expert resident is an upper bound on what a cache can give for this shape and profile
    assert result["resident"].hit_rate == 1.0
    assert result["hybrimoe"].predictor.startswith("truth-with-noise(0.8)")
    assert result["ktransformers"].predictor == "none"


def test_forward_times_add_dense_moe_makespans_and_lm_head_once():
    """Hand-timed forwards with an empty cache and no staging buffer (nothing to prefetch into): a decode forward is
    4 x (dense + MoE makespan) + LM head, each counted once."""
    trace = _trace(6)
    workload = build_workload(trace)
    prefill_experts = [len({e for t in workload.prefill for e in t.layers[l].experts}) for l in range(4)]
    # kTransformers: decode misses on the CPU (first expert 0.35 s, second 0.3 s); prefill copies
    # every activated expert (0.4 s each, back to back), the GPU's last one ends 0.1 s after its copy
    r = Simulator(_Shape(), COSTS, SimConfig(get_preset("ktransformers"), 0.0)).run(trace, workload)
    assert r.tbt_seconds == pytest.approx(4 * (0.5 + 0.65) + 0.2)
    assert r.ttft_seconds == pytest.approx(sum(0.5 + 0.4 * n + 0.1 for n in prefill_experts) + 0.2)
    # HybriMoE decode: copy one expert and run it on the GPU (0.4 + 0.1) while the CPU runs the other
    # (0.35): 0.5 s per layer, better than both on the CPU (0.65) or both copied (0.9)
    r = Simulator(_Shape(), COSTS, SimConfig(get_preset("hybrimoe"), 0.0, staging_slots=0)).run(trace, workload)
    assert r.tbt_seconds == pytest.approx(4 * (0.5 + 0.5) + 0.2)
    assert r.prefetch_copies == 0


@pytest.mark.parametrize("name", ["hybrimoe", "gpu-lru", "hybrimoe-prefetch-only"])
def test_link_time_is_one_copy_per_expert_moved(name):
    trace = _trace(7)
    r = Simulator(_Shape(), COSTS, SimConfig(get_preset(name), 0.5, predictor_accuracy=1.0)).run(
        trace, build_workload(trace))
    copies = r.bytes_copied // COSTS.expert_bytes
    assert copies > 0
    assert r.link_busy * r.total_seconds == pytest.approx(0.4 * copies)  # on-demand + prefetch + fill
    assert r.prefetch_copies <= copies


def test_warmup_never_includes_the_simulated_trace_itself(tmp_path):
    """The hot set comes from the model's other dev traces: a dev trace given as its original file
    (or any copy) must not warm the cache with its own routing."""
    from hybrimoe.sim.runner import make_setup

    model = "qwen1.5-moe-a2.7b"
    dev = packaged_traces(model, "dev")
    copy = tmp_path / dev[0].path.name
    copy.write_bytes(dev[0].path.read_bytes())
    original = tmp_path / (dev[0].path.name.split(".")[0] + ".json")  # e.g. cooking_1.json
    for path in (dev[0].path, copy, original):
        setup = make_setup(RoutingTrace.load(dev[0].path), path.name, model, "paper-a6000", path)
        assert len(setup.warmup) == len(dev) - 1
