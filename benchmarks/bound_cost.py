"""What the fluid bound (hybrimoe.sim.bound) costs and how exact it is, over the bench's main block.

Runs every (model, policy, cache ratio, prompt) of `hybrimoe bench`'s main block plus `resident`,
times the simulation and, separately, the bound of every logged forward, and prints one JSON row:
seconds of each, forwards, the largest relative gap between the bound and the feasible fractional
schedule the search ends on (the LP value lies between them), and the CPU. Simulated costs
(paper-a6000); the timings are measured on this machine.

    .venv/bin/python benchmarks/bound_cost.py
"""

from __future__ import annotations

import json
import platform
import time

from hybrimoe.sim.bench import TUNED, BenchConfig, _setups
from hybrimoe.sim.bound import forward_bound
from hybrimoe.sim.runner import simulate_one


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    config = BenchConfig()
    sim_s = bound_s = gap = 0.0
    forwards = 0
    for model, setups in _setups(config).items():
        for ratio in config.ratios:
            for policy in config.policies + ("resident",):
                jobs = [(setups[0], n, 0) for n in config.prompts] + [(s, None, config.max_decode) for s in setups]
                for setup, prompt, decode in jobs:
                    t0 = time.process_time()
                    _, sim = simulate_one(setup, policy, ratio, prompt, decode, **TUNED)
                    t1 = time.process_time()
                    bounds = [forward_bound(f, setup.costs) for f in sim.forwards]
                    t2 = time.process_time()
                    sim_s += (t1 - t0) - (t2 - t1)  # simulate_one computes the bounds once too
                    bound_s += t2 - t1
                    forwards += len(bounds)
                    gap = max([gap] + [(b.upper - b.seconds) / b.upper for b in bounds])
    print(json.dumps({"what": "fluid bound cost over the bench main block (+resident)", "cpu": _cpu(),
                      "simulation_cpu_seconds": round(sim_s, 2), "bound_cpu_seconds": round(bound_s, 2),
                      "forwards": forwards, "max_relative_gap": gap}))


if __name__ == "__main__":
    main()
