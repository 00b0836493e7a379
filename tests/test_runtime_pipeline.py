"""The runtime runs the simulator's copy queue: on the same replayed trace, the same costs and the
cost model's clock, it issues exactly the copies the simulator's link queue gives, in that order,
to the same destinations (cache slot, prefetch staging buffer, transient buffer)."""

from __future__ import annotations

import random

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.loader import build_dummy_model
from hybrimoe.moe.install import install_runtime
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.predictor import TruthWithNoise
from hybrimoe.policy.presets import get_preset
from hybrimoe.runtime_options import RuntimeOptions
from hybrimoe.sim.costs import UniformCosts
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from hybrimoe.tiny import tiny_config
from hybrimoe.trace.format import LayerRouting, RoutingTrace, TokenRouting, TraceHeader

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

# seconds on the virtual clock: a copy (0.4) + GPU (0.1) beats the CPU (0.3 per token) from 2 tokens
COSTS = LinearCosts(cpu_per_token=0.3, gpu_fixed=0.1, copy_seconds=0.4)
DENSE = 0.5  # seconds of dense work before every MoE layer
PROMPT, DECODE = 5, 10


def _model():
    config = ModelConfig.from_dict(tiny_config("qwen3-moe", 256, [0], layers=5, experts=8, top_k=2,
                                               hidden=64).to_dict())
    return build_dummy_model(config, "fp32", seed=3, std=0.1)


def _trace(moe_layers: tuple[int, ...], seed: int) -> RoutingTrace:
    """Sticky routing (a fixture, not a model's behaviour); weights exact in fp32 so the runtime's
    MRS scores (fp32 tensors) equal the simulator's (Python floats)."""
    rng = random.Random(seed)
    header = TraceHeader(model="fixture", num_layers=max(moe_layers) + 1, num_experts=8, top_k=2,
                         moe_layers=list(moe_layers), source="test fixture")
    tokens = []
    for pos in range(PROMPT + DECODE):
        layers = {l: LayerRouting(rng.sample(range(4), 2) if rng.random() < 0.6 else rng.sample(range(8), 2),
                                  [0.75, 0.25]) for l in moe_layers}
        tokens.append(TokenRouting(0, pos, "prefill" if pos < PROMPT else "decode", layers))
    return RoutingTrace(header, tokens)


@pytest.mark.parametrize("policy,ratio,seed", [("hybrimoe", 0.25, 1), ("hybrimoe", 0.0, 2),
                                               ("hybrimoe-prefetch-only", 0.25, 3), ("gpu-lru", 0.25, 4)])
def test_runtime_issues_the_copies_of_the_simulators_queue_in_order(tmp_path, policy, ratio, seed):
    model = _model()
    trace = _trace(model.config.moe_layers, seed)
    path = tmp_path / "trace.jsonl.gz"
    trace.save(path)

    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=ratio, replay_trace=str(path),
                                                    cpu_threads=1, prefetch_depth=2, staging_slots=2), costs=COSTS)
    runtime.use_virtual_clock(DENSE)
    runtime.pipeline.link.log = []
    issued: list[tuple] = []  # what the runtime put on its copy stream, in order
    cache = runtime.cache
    copy_into_slot, stage, staging_buffer = cache.copy_into_slot, cache.stage, cache.staging_buffer
    cache.copy_into_slot = lambda key, slot=None: (issued.append(("slot", key)), copy_into_slot(key, slot))[1]
    cache.stage = lambda key: (issued.append(("staging", key)), stage(key))[1]
    cache.staging_buffer = lambda layer: (issued.append(("transient", layer)), staging_buffer(layer))[1]
    try:
        kv = model.new_kv_cache(32)
        model(torch.arange(PROMPT) + 3, 0, kv)
        for pos in range(PROMPT, PROMPT + DECODE):
            model(torch.tensor([pos]), pos, kv)
    finally:
        runtime.close()
    decided = runtime.pipeline.link.log

    shape = type("Shape", (), dict(name="fixture", num_layers=model.config.num_layers,
                                   moe_layers=model.config.moe_layers, num_experts=8, top_k=2))()
    config = SimConfig(get_preset(policy), ratio, predictor=TruthWithNoise(1.0, 8), horizon=2, staging_slots=2)
    sim = Simulator(shape, UniformCosts(COSTS, dense_seconds=DENSE), config, [trace])
    result = sim.run(trace, build_workload(trace, prompt_tokens=PROMPT, max_decode=DECODE))
    simulated = sim.link_log

    assert [(c.key, c.kind, c.dest) for c in decided] == [(c.key, c.kind, c.dest) for c in simulated]
    assert [c.start for c in decided] == pytest.approx([c.start for c in simulated])
    assert issued == [(c.dest, c.key if c.dest != "transient" else c.key[0]) for c in decided]
    assert len(decided) > 4 and result.decode_steps == DECODE
    if policy.startswith("hybrimoe"):
        assert any(c.kind == "prefetch" for c in decided)
    if ratio == 0.0:
        assert any(c.dest == "staging" for c in decided)  # no slot to keep a prefetch in
