"""Planning cost per decode MoE layer (pure Python policy code), measured on this machine's CPU.

For A = 2/4/8/16 activated experts per layer (decode: one token each, Qwen3.6-35B-A3B shape: 256
experts, 40 MoE layers, paper-a6000 costs, MRS cache of a quarter of the experts, steady state of a
decode run on the cost model's clock), it times:
- critical: what runs before the layer's GPU work can be issued: the pipeline's view, the `hybrid`
  scheduler's plan and the on-demand copies (this is on the critical path of every layer);
- prefetch: the pipeline's prefetches and fills for the next 3 layers (impact prefetcher on the real
  link state); the runtime issues this after the layer's GPU work, while the GPU and the CPU worker
  compute, so it is off the GPU's critical path as long as it is shorter than the layer.
The simulator charges neither (its clock is the cost model's; BENCH.md says so).
One JSON row per A (microseconds per layer: median and 90th percentile), with the CPU model.

    .venv/bin/python benchmarks/bench_planning.py --out benchmarks/results/planning.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

from hybrimoe.policy.cache_policy import make_policy
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.pipeline import CopyPipeline
from hybrimoe.policy.prefetch import get_prefetcher
from hybrimoe.policy.schedule import get_scheduler
from hybrimoe.policy.shape import ModelShape
from hybrimoe.sim.costs import ProfileCosts
from machine import cpu_model, print_and_write  # benchmarks/machine.py




def measure(active: int, tokens: int, seed: int = 0) -> dict:
    """A decode run on the virtual clock: `tokens` steps over every MoE layer, `active` experts per
    layer drawn at random (uniform: a planning-cost fixture, not a model's routing), MRS cache at 25%,
    impact prefetch with the true next-layer routing; per layer the two parts are timed."""
    shape = ModelShape.named("qwen3.6-35b-a3b")
    costs = ProfileCosts(CostModel.load("paper-a6000"), shape)
    rng = random.Random(seed)
    layers = list(shape.moe_layers)
    scheduler = get_scheduler("hybrid")
    cache = CacheState(len(layers) * shape.num_experts // 4, make_policy("mrs", top_k=shape.top_k))
    cache.preload((layer, e) for layer in layers for e in rng.sample(range(shape.num_experts), shape.num_experts // 4))
    pipe = CopyPipeline(cache, costs.experts, layers, 3, get_prefetcher("impact"), fill_misses=True, staging_slots=4)
    critical, prefetch = [], []
    now = 0.0
    for step in range(tokens + 8):  # the first 8 steps warm the cache and the policy up (not timed)
        routing = {layer: rng.sample(range(shape.num_experts), active) for layer in layers}
        for layer in layers:
            counts = {e: 1 for e in routing[layer]}
            cache.policy.observe(layer, None, routing[layer], [1.0 / active] * active)
            current = {(layer, e) for e in counts}
            predicted = {f: {e: 1 for e in routing[f]} for f in pipe.future(layer)}
            gap = costs.dense(layer, 1, 512)
            t0 = time.perf_counter()
            view = pipe.view(layer, counts, now)
            for e in counts:
                cache.access((layer, e))
            plan = scheduler.plan(layer, counts, view.cached, costs.experts(layer), view.copy_free_at,
                                  arrivals=view.arrivals)
            pipe.demand(layer, plan, now, False, current)
            t1 = time.perf_counter()
            pipe.idle(layer, plan, now, predicted, gap, lambda f: gap, scheduler, current, counts)
            t2 = time.perf_counter()
            pipe.layer_done(layer)
            now += plan.makespan + gap
            if step >= 8:
                critical.append((t1 - t0) * 1e6)
                prefetch.append((t2 - t1) * 1e6)
    n = len(critical)
    return {"bench": "planning", "activated_experts": active, "tokens_per_layer": 1, "model_shape": shape.name,
            "critical_us_median": statistics.median(critical), "critical_us_p90": sorted(critical)[int(0.9 * n)],
            "prefetch_us_median": statistics.median(prefetch), "prefetch_us_p90": sorted(prefetch)[int(0.9 * n)],
            "prefetch_copies_per_layer": pipe.link.copies["prefetch"] / ((tokens + 8) * len(layers)),
            "layers_timed": n, "cpu": cpu_model(), "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(), "measured": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=20, help="decode steps timed per row (after 8 warm-up steps)")
    parser.add_argument("--out", help="also write the rows here (JSON lines)")
    args = parser.parse_args()
    rows = [measure(a, args.tokens) for a in (2, 4, 8, 16)]
    text = "\n".join(json.dumps(r) for r in rows)
    print_and_write(text, args.out)


if __name__ == "__main__":
    main()
