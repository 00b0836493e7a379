"""The simulator on a hand-made trace: every non-prefetching preset's times, hit rates, bytes and busy
seconds, computed by hand below (each line of arithmetic is the plan the preset's scheduler must make).

Model: 2 MoE layers (0, 1), 4 experts, top-2; cache ratio 0.5 = 4 slots. Costs (seconds, eager):
cpu(n) = 2n (+0.5 for the layer's first CPU expert), gpu = 1 per expert, copy = 3, dense = 1 per
layer, LM head = 0.5, 7 bytes per expert. Under CUDA graphs (kTransformers' decode): gpu = 0.5,
dense = 0.8, LM head = 0.3. Warm-up (hot set) frequencies: (0,0) = (1,0) = 4, (0,1) = (1,1) = 3, the
rest <= 1, so the hot set is H = {(0,0), (1,0), (0,1), (1,1)}.
Trace: prefill A = (L0 [0,1], L1 [1,2]), B = (L0 [0,2], L1 [1,3]): counts L0 {0:2, 1:1, 2:1},
L1 {1:2, 2:1, 3:1}; decode C = (L0 [0,3], L1 [0,1]), D = (L0 [1,2], L1 [0,2]); weights [0.6, 0.4].
"""

from __future__ import annotations

import pytest

from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.presets import get_preset, initial_content
from hybrimoe.sim.costs import UniformCosts
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from hybrimoe.trace.format import LayerRouting, RoutingTrace, TokenRouting, TraceHeader

GRAPH = UniformCosts(LinearCosts(cpu_per_token=2.0, gpu_fixed=0.5, copy_seconds=3.0, cpu_first_extra=0.5),
                     dense_seconds=0.8, lm_head_seconds=0.3, expert_bytes=7)
COSTS = UniformCosts(LinearCosts(cpu_per_token=2.0, gpu_fixed=1.0, copy_seconds=3.0, cpu_first_extra=0.5),
                     dense_seconds=1.0, lm_head_seconds=0.5, expert_bytes=7, graph=GRAPH)


class Shape:
    name, num_layers, moe_layers, num_experts, top_k = "hand", 2, (0, 1), 4, 2


def _trace(tokens: list[tuple[str, list[int], list[int]]]) -> RoutingTrace:
    header = TraceHeader(model="hand", num_layers=2, num_experts=4, top_k=2, moe_layers=[0, 1])
    return RoutingTrace(header, [TokenRouting(0, pos, phase, {0: LayerRouting(l0, [0.6, 0.4]), 1: LayerRouting(l1, [0.6, 0.4])})
                                 for pos, (phase, l0, l1) in enumerate(tokens)])


TRACE = _trace([("prefill", [0, 1], [1, 2]), ("prefill", [0, 2], [1, 3]),
                ("decode", [0, 3], [0, 1]), ("decode", [1, 2], [0, 2])])
WARMUP = _trace([("decode", [0, 1], [0, 1])] * 3 + [("decode", [0, 2], [0, 3])])
HOT = [(0, 0), (1, 0), (0, 1), (1, 1)]

# preset -> TTFT, TBT (mean of C and D), hits and misses (prefill, decode), copies, busy seconds
# (cpu, gpu, copy), total seconds. The derivations:
EXPECTED = {
    # prefill (eager, gpu-only): L0 copies 2 (0-3), GPU 0 (0-1), 1 (1-2), 2 (3-4) -> 4; L1 copies 2, 3
    # (0-3, 3-6), GPU 1 (0-1), 2 (3-4), 3 (6-7) -> 7: 1+4+1+7+0.5 = 13.5. Decode under graphs,
    # misses on the CPU: C = 0.8 + max(0.5, 2.5) + 0.8 + (0.5+0.5) + 0.3 = 5.4, D = 0.8+2.5+0.8+2.5+0.3 = 6.9
    "ktransformers": dict(ttft=13.5, tbt=6.15, prefill=(3, 3), decode=(5, 3), copies=3,
                          busy=(7.5, 8.5 + 6.3, 9.0), total=25.8),
    # last whole layer on the GPU (layer 1), layer 0 on the CPU; a 2-token prompt is < 32 tokens:
    # no op offload. Prefill L0 CPU [1,2,0] = 2.5+2+4 = 8.5, L1 GPU 3: 1+8.5+1+3+0.5 = 14;
    # decode L0 CPU 2.5+2 = 4.5, L1 GPU 2: 1+4.5+1+2+0.5 = 9 twice
    "llamacpp": dict(ttft=14.0, tbt=9.0, prefill=(3, 3), decode=(4, 4), copies=0,
                     busy=(17.5, 14.5, 0.0), total=32.0),
    "llamacpp-no-op-offload": dict(ttft=14.0, tbt=9.0, prefill=(3, 3), decode=(4, 4), copies=0,
                                   busy=(17.5, 14.5, 0.0), total=32.0),
    # prefill as kTransformers (copies go through a transient buffer: the cache is full). Decode copies
    # every miss, LRU evicts: C L0 copies 3 (evicts (1,0)): 4; C L1 misses (1,0) again, copies it
    # (evicts (0,1)): 1 (0-1), 0 (3-4) -> 4: 10.5; D L0 misses both (evicts (0,0), (0,3)): 7; D L1
    # copies 2 (evicts (1,1)): 4: 13.5
    "gpu-lru": dict(ttft=13.5, tbt=12.0, prefill=(3, 3), decode=(3, 5), copies=8,
                    busy=(0.0, 21.5, 24.0), total=37.5),
    # prefill: copy + GPU (3 + 1) is not below the CPU (2n for n <= 2): every miss on the CPU.
    # L0 GPU 0, 1 (2), CPU 2 (2.5) -> 2.5; L1 GPU 1, CPU 2, 3 (2.5 + 2) -> 4.5: 1+2.5+1+4.5+0.5 = 9.5;
    # decode eager, misses on the CPU: C = 1+2.5+1+2+0.5 = 7, D = 1+2.5+1+2.5+0.5 = 7.5
    "fiddler": dict(ttft=9.5, tbt=7.25, prefill=(3, 3), decode=(5, 3), copies=0,
                    busy=(14.5, 15.5, 0.0), total=24.0),
    # every expert cached, hybrid plans: prefill L0 GPU 0, 1 (2) while the CPU takes 2 (2.5) -> 2.5
    # (all on the GPU: 3); L1 likewise -> 2.5: 1+2.5+1+2.5+0.5 = 7.5; decode: a CPU expert (2.5) is
    # slower than the GPU's two (2): 1+2+1+2+0.5 = 6.5
    "resident": dict(ttft=7.5, tbt=6.5, prefill=(6, 0), decode=(8, 0), copies=0,
                     busy=(5.0, 19.5, 0.0), total=20.5),
    # hybrid: prefill L0 CPU takes the miss 2 (2.5) while the GPU runs 0, 1 -> 2.5 (copying it: 4);
    # L1 copies 2 (GPU 3-4), CPU 3 (2.5), GPU 1 -> 4 (no copy: 4.5, both: 7): 1+2.5+1+4+0.5 = 9;
    # decode as Fiddler's (a copy, 3 + 1, never beats the CPU, 2.5): 7 and 7.5
    "hybrimoe-sched-only": dict(ttft=9.0, tbt=7.25, prefill=(3, 3), decode=(5, 3), copies=1,
                                busy=(12.5, 16.5, 3.0), total=23.5),
    # prefill as kTransformers; decode misses on the CPU, then copied in link idle time when MRS values
    # them above the victim: C L0 fills (0,3) over (1,0) (S 0.2 > 0); C L1 misses (1,0), fills it over
    # (0,1) (0.3 > 0.05); D L0 misses (0,1), (0,2): fills (0,1) over (0,3) (0.325 > 0.1), (0,2) does
    # not fit the window (25 + 3 > 27.5); D L1 fills (1,2) over (1,1) (0.225 > 0.2125).
    # C = 1+2.5+1+2.5+0.5 = 7.5, D = 1+4.5+1+2.5+0.5 = 9.5
    "hybrimoe-cache-only": dict(ttft=13.5, tbt=8.5, prefill=(3, 3), decode=(3, 5), copies=7,
                                busy=(12.0, 16.5, 21.0), total=30.5),
}


def _run(name: str):
    sim = Simulator(Shape(), COSTS, SimConfig(get_preset(name), 0.5), warmup=[WARMUP])
    return sim.run(TRACE, build_workload(TRACE))


def test_the_hot_set_is_the_most_frequent_experts():
    from hybrimoe.policy.cache_policy import activation_frequency

    freq = activation_frequency((l, r.experts) for tok in WARMUP.tokens for l, r in tok.layers.items())
    keys, capacity, _ = initial_content(get_preset("ktransformers"), [0, 1], 4, 4, freq)
    assert keys == HOT and capacity == 4
    keys, _, _ = initial_content(get_preset("ktransformers"), [0, 1], 4, 2, freq)
    assert keys == [(0, 0), (1, 0)]  # the two most frequent, ties by key


def assert_bytes_total_and_busy(r, e: dict) -> None:
    """A run's bytes copied (7 per expert), total seconds and busy seconds of CPU, GPU and link against
    the hand-computed figures `e` (keys copies, total, busy)."""
    assert r.bytes_copied == 7 * e["copies"]
    assert r.total_seconds == pytest.approx(e["total"])
    cpu, gpu, link = e["busy"]
    assert r.cpu_busy * r.total_seconds == pytest.approx(cpu)
    assert r.gpu_busy * r.total_seconds == pytest.approx(gpu)
    assert r.link_busy * r.total_seconds == pytest.approx(link)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_non_prefetching_presets_match_the_hand_computed_run(name):
    e = EXPECTED[name]
    r = _run(name)
    assert r.ttft_seconds == pytest.approx(e["ttft"])
    assert r.tbt_seconds == pytest.approx(e["tbt"])
    (ph, pm), (dh, dm) = e["prefill"], e["decode"]
    assert r.prefill_hit_rate == pytest.approx(ph / (ph + pm))
    assert r.decode_hit_rate == pytest.approx(dh / (dh + dm))
    assert r.hit_rate == pytest.approx((ph + dh) / (ph + pm + dh + dm))
    assert_bytes_total_and_busy(r, e)
    assert r.prefetch_copies == 0


def test_kTransformers_decode_pays_graph_launch_costs_and_its_prefill_eager_ones():
    """The same preset without CUDA graphs: prefill unchanged, decode priced eager
    (C = 1+2.5+1+2+0.5 = 7, D = 1+2.5+1+2.5+0.5 = 7.5, Fiddler's decode)."""
    import dataclasses

    eager = dataclasses.replace(get_preset("ktransformers"), cuda_graphs=False)
    r = Simulator(Shape(), COSTS, SimConfig(eager, 0.5), warmup=[WARMUP]).run(TRACE, build_workload(TRACE))
    assert r.ttft_seconds == pytest.approx(13.5) and r.tbt_seconds == pytest.approx(7.25)


def test_tokens_lacking_a_moe_layer_are_left_out_of_the_workload():
    """A decode token without layer 1's routing would cost that layer no expert work."""
    broken = _trace([("prefill", [0, 1], [1, 2]), ("decode", [0, 3], [0, 1]), ("decode", [1, 2], [0, 2])])
    del broken.tokens[1].layers[1]
    w = build_workload(broken)
    assert [t.pos for t in w.decode] == [2] and len(w.prefill) == 1
    assert any("1 trace tokens lacking routing" in n for n in w.notes)
    r = Simulator(Shape(), COSTS, SimConfig(get_preset("fiddler"), 0.5), warmup=[WARMUP]).run(broken, w)
    assert r.decode_steps == 1 and r.tbt_seconds == pytest.approx(7.5)  # token D alone, as above
