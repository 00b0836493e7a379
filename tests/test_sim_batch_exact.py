"""Batched decode (B = 2) on a hand-made trace: times, hit counts, bytes and busy seconds computed by
hand below, for kTransformers (misses on the CPU, CUDA-graph decode) and gpu-lru (every miss copied,
LRU evicting: the pipeline's prefill rule must not apply to a batched decode step).

Model and costs as tests/test_sim_exact.py: 2 MoE layers (0, 1), 4 experts, top-2, 4 slots, hot set
H = {(0,0), (1,0), (0,1), (1,1)}; eager cpu(n) = 2n (+0.5 for a layer's first CPU expert), gpu = 1 per
expert, copy = 3, dense = 1 per layer, LM head 0.5, 7 bytes per expert; under CUDA graphs gpu = 0.5,
dense = 0.8, LM head 0.3. Trace: one sequence of four decode tokens, no prompt:
T0 = (L0 [0,1], L1 [0,2]), T1 = (L0 [0,3], L1 [1,2]), T2 = (L0 [0,2], L1 [0,1]), T3 = (L0 [1,2], L1 [2,3]).
Batch 2, 2 steps: lanes start at offsets 0 and 4 * 1 // 2 = 2, so step 0 = [T0, T2], step 1 = [T1, T3];
per-expert token counts: step 0 L0 {0:2, 1:1, 2:1}, L1 {0:2, 2:1, 1:1}; step 1 L0 {0:1, 3:1, 1:1, 2:1},
L1 {1:1, 2:2, 3:1}.
"""

from __future__ import annotations

import pytest

from hybrimoe.policy.presets import get_preset
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from test_sim_exact import COSTS, WARMUP, Shape, _trace, assert_bytes_total_and_busy

TRACE = _trace([("decode", [0, 1], [0, 2]), ("decode", [0, 3], [1, 2]), ("decode", [0, 2], [0, 1]),
                ("decode", [1, 2], [2, 3])])

EXPECTED = {
    # graphs: step 0 L0 GPU 0, 1 (0.5 + 0.5), CPU 2 (2 + 0.5) -> 2.5; L1 likewise -> 2.5:
    # 0.8 + 2.5 + 0.8 + 2.5 + 0.3 = 6.9. Step 1 L0 GPU 0, 1 (1.0), CPU 2, 3 (2.5 + 2) -> 4.5; L1 GPU 1
    # (0.5), CPU lowest count first: 3 (2 + 0.5), then 2 over its 2 tokens (4) -> 6.5:
    # 0.8 + 4.5 + 0.8 + 6.5 + 0.3 = 12.9. Hits 4 + 3, misses 2 + 4; CPU 5 + 11, GPU 2 x 1.9 dense + 3.5.
    "ktransformers": dict(tbt=(6.9 + 12.9) / 2, hits=7, misses=6, copies=0, busy=(16.0, 7.3, 0.0), total=19.8),
    # eager. LRU clock after preload: (1,1) < (0,1) < (1,0) < (0,0); observe touches every token's experts.
    # Step 0 L0 at 1: copy 2 (1-4) evicts (1,1) (oldest unpinned); GPU 0 (0-1), 1 (1-2), 2 (3-4) -> 4.
    # L1 at 6: only (1,0) cached; copies 1 (6-9), 2 (9-12) evict (0,0), (0,1); GPU 0 (0-1), 1 (3-4),
    # 2 (6-7) -> 7: step 0 = 1 + 4 + 1 + 7 + 0.5 = 13.5. Step 1 L0 at 14.5: (0,2) cached (admitted by
    # eviction in step 0: no prefill rule), copies 0, 1, 3 (tied counts: by id) evict (1,0), (1,1),
    # (1,2); GPU 2 (0-1), 0 (3-4), 1 (6-7), 3 (9-10) -> 10. L1 at 25.5: nothing cached; copies 2 (two
    # tokens first), 1, 3; GPU at 3-4, 6-7, 9-10 -> 10: step 1 = 1 + 10 + 1 + 10 + 0.5 = 22.5.
    # Hits 2 + 1 + 1 + 0, misses 1 + 2 + 3 + 3; 9 copies; GPU 2 x 2.5 dense + 3 + 3 + 4 + 3.
    "gpu-lru": dict(tbt=(13.5 + 22.5) / 2, hits=4, misses=9, copies=9, busy=(0.0, 18.0, 27.0), total=36.0),
}


def _run(name: str, batch: int = 2):
    sim = Simulator(Shape(), COSTS, SimConfig(get_preset(name), 0.5), warmup=[WARMUP])
    return sim.run(TRACE, build_workload(TRACE, None, 2, batch)), sim


def test_lanes_are_evenly_spaced_windows_of_the_decode_stream():
    w = build_workload(TRACE, None, 2, 2)
    assert [[t.pos for t in step] for step in w.decode_steps] == [[0, 2], [1, 3]]
    assert w.batch == 2 and [t.pos for t in w.decode] == [0, 1]  # lane 0 = batch 1's decode
    w = build_workload(TRACE, None, None, 3)  # offsets 0, 1, 2; 4 steps, lanes wrap at the end
    assert [[t.pos for t in step] for step in w.decode_steps] == [[0, 1, 2], [1, 2, 3], [2, 3, 0], [3, 0, 1]]
    assert any("wrap" in n for n in w.notes)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_batch_2_matches_the_hand_computed_run(name):
    e = EXPECTED[name]
    r, sim = _run(name)
    assert r.batch == 2 and r.decode_steps == 2 and r.ttft_seconds is None
    assert r.tbt_seconds == pytest.approx(e["tbt"])
    assert r.decode_tokens_per_second == pytest.approx(2 * 2 / e["total"])
    assert r.decode_hit_rate == pytest.approx(e["hits"] / (e["hits"] + e["misses"]))
    assert_bytes_total_and_busy(r, e)


def test_each_layer_plans_the_union_of_the_steps_experts_with_token_counts():
    _, sim = _run("ktransformers")
    counts = [[(layer.layer, layer.counts) for layer in f.layers] for f in sim.forwards]
    assert counts == [[(0, {0: 2, 1: 1, 2: 1}), (1, {0: 2, 2: 1, 1: 1})],
                      [(0, {0: 1, 3: 1, 1: 1, 2: 1}), (1, {1: 1, 2: 2, 3: 1})]]
    assert [f.tokens for f in sim.forwards] == [2, 2] and [f.phase for f in sim.forwards] == ["decode"] * 2
    assert [f.context for f in sim.forwards] == [0, 1]  # every lane's context: prompt (none) + steps so far


def test_a_step_never_beats_its_bound():
    from hybrimoe.sim.bound import forward_bound

    for name in EXPECTED:
        _, sim = _run(name)
        for f in sim.forwards:
            assert forward_bound(f, sim.phase_costs("decode")).seconds <= f.seconds * (1 + 1e-12), name


def test_batch_above_the_decode_tokens_is_refused():
    from hybrimoe.errors import ConfigError

    with pytest.raises(ConfigError, match="batch 5 needs at least 5 decode tokens"):
        build_workload(TRACE, None, 2, 5)
    with pytest.raises(ConfigError, match="--batch must be >= 1"):
        build_workload(TRACE, None, 2, 0)
