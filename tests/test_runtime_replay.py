"""Benchmark mode of the hybrid runtime: routers that replay a recorded trace, random weights for a
config.json (--dummy-weights), and a CPU smoke run of benchmarks/bench_policies_gpu.py."""

from __future__ import annotations

import pytest
import torch

from hybrimoe.moe.install import install_runtime
from hybrimoe.moe.layer import ReferenceExecutor
from hybrimoe.moe.replay import ReplayExecutor, TraceRouting
from hybrimoe.runtime_options import RuntimeOptions
from hybrimoe.tiny import tiny_config
from hybrimoe.trace.format import LayerRouting, RoutingTrace, TokenRouting, TraceHeader
from test_runtime import COSTS, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

def _trace(num_experts: int = 8, k: int = 2) -> RoutingTrace:
    header = TraceHeader(model="t", num_layers=2, num_experts=num_experts, top_k=k, moe_layers=[0, 1])
    tokens = [TokenRouting(seq=0, pos=p, phase="decode",
                           layers={l: LayerRouting([(p + l) % num_experts, (p + l + 3) % num_experts], [0.7, 0.3])
                                   for l in (0, 1)}) for p in range(5)]
    return RoutingTrace(header, tokens)


def test_replay_routes_by_the_trace_cycling_and_mapping_layers() -> None:
    routing = TraceRouting(_trace(), moe_layers=(1, 2, 3), num_experts=8)
    assert routing.layer_map == {1: 0, 2: 1, 3: 0}
    seen = []

    class Spy:
        def run(self, layer, x, ids, w):
            seen.append((layer, ids.tolist(), w.tolist()))
            return torch.zeros_like(x)

    replay = ReplayExecutor(Spy(), routing)
    replay.run(1, torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    replay.run(2, torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
    replay.run(1, torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))  # wraps at 5
    assert seen[0][1] == [[0, 3], [1, 4], [2, 5]] and seen[0][2][0] == pytest.approx([0.7, 0.3])
    assert seen[1][1] == [[1, 4], [2, 5], [3, 6]]
    assert seen[2][1] == [[3, 6], [4, 7], [0, 3]]
    assert routing.frequency()[(1, 3)] == 2.0 and routing.frequency()[(1, 0)] == 1.0


def test_replay_rejects_experts_the_model_lacks() -> None:
    from hybrimoe.errors import TraceError
    with pytest.raises(TraceError, match="expert"):
        TraceRouting(_trace(num_experts=8), moe_layers=(1,), num_experts=4)


def test_runtime_with_replayed_trace_matches_reference_with_same_routing(tmp_path) -> None:
    model = tiny("mixtral", top_k=2)
    path = tmp_path / "t.jsonl"
    _trace().save(path)
    routing = TraceRouting.load(path, model.config.moe_layers, model.config.num_experts)
    for block in model.moe_blocks.values():
        block.executor = ReplayExecutor(block.executor, routing)
    kv = model.new_kv_cache(16)
    expected = model(torch.tensor([1, 2, 3, 4]), 0, kv)
    model.set_executor(ReferenceExecutor(model.expert_store))
    runtime = install_runtime(model, RuntimeOptions(policy="hybrimoe", cache_ratio=0.25, cpu_threads=1,
                                                    replay_trace=str(path)), costs=COSTS)
    try:
        got = model(torch.tensor([1, 2, 3, 4]), 0, model.new_kv_cache(16))
        assert runtime.replay is not None and runtime.stats()["cache"]["misses"] > 0
    finally:
        runtime.close()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_dummy_weights_from_a_config_json(tmp_path) -> None:
    from hybrimoe.moe.install import load_with_runtime

    config = tmp_path / "config.json"
    config.write_text(tiny_config("olmoe", 128, [0], layers=2, experts=4, top_k=2, hidden=32).to_json_string())
    model, runtime = load_with_runtime(None, "fp32", RuntimeOptions(policy="gpu-lru", cache_ratio=0.25,
                                                                    dummy_weights=str(config), cpu_threads=1))
    try:
        logits = model(torch.tensor([1, 2, 3]), 0, model.new_kv_cache(4))
        assert logits.shape == (3, 128) and torch.isfinite(logits).all()
        assert runtime.stats()["cache"]["slots"] == 2
    finally:
        runtime.close()


def test_policies_benchmark_smoke_on_cpu(tmp_path, monkeypatch, capsys) -> None:
    """benchmarks/bench_policies_gpu.py runs on the CPU fallback with a shrunken DeepSeek-V2-Lite shape."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_policies_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_policies_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    shrink = ["hidden_size=64", "moe_intermediate_size=32", "intermediate_size=128", "vocab_size=256",
              "kv_lora_rank=16", "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16",
              "num_attention_heads=4", "num_key_value_heads=4"]
    assert bench.main(["--device", "cpu", "--dtype", "fp32", "--layers", "3", "--override", *shrink,
                       "--prompt-tokens", "8", "--decode-tokens", "2", "--policies", "hybrimoe,resident",
                       "--cpu-threads", "1", "--predict-profile", "paper-a6000"]) == 0
    rows = json.loads((tmp_path / "bench_policies_gpu.json").read_text())
    assert [(r["policy"], r["phase"]) for r in rows] == [("hybrimoe", "prefill"), ("hybrimoe", "decode"),
                                                          ("resident", "prefill"), ("resident", "decode")]
    assert all(r["measured_s"] > 0 and r["predicted_moe_s"] > 0 and r["trace_top_k"] == 4 for r in rows)
    assert rows[2]["hit_rate"] == 1.0 and rows[0]["hit_rate"] < 1.0
    assert "replayed trace" in rows[0]["prefetch"] and rows[2]["prefetch"] == "none"  # not the random gates
    assert all(r["profile"] == "paper-a6000" and r["profile_total_s"] > r["profile_moe_s"] > 0 for r in rows)
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]) == 4
