"""Exact best plan of a small MoE layer, by exhaustive search (the yardstick for `hybrid`).

Search space: each activated expert goes to the CPU or the GPU (a GPU expert that is not cached
is copied first). For a fixed assignment the best orders are known, so only 2^A assignments are
enumerated (A <= `max_experts`):
- GPU: cached experts first (they are available at once), then experts in flight (`arrivals`, by
  arrival: the link is FIFO, so they land before any new copy), then copied experts in copy order;
  with equal copy durations, copying in descending GPU time minimises the GPU finish
  (exchange argument: finish = max_j (ready_j + sum of GPU times from j on), ready_j = j * copy).
- CPU: the order changes only which expert pays the `first` surcharge; the best first expert is
  the one whose surcharge cpu(n, True) - cpu(n, False) is smallest.
Branch and bound: experts are assigned in descending load; a branch stops as soon as the CPU's
running sum, or a lower bound of the GPU finish, reaches the best makespan found so far.
Layers with more than `max_experts` activated experts go to the fallback scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrimoe.policy.plan import ExpertCosts, Plan, build_plan


@dataclass
class OptimalScheduler:
    fallback: object | None = None  # a Scheduler for layers above max_experts
    max_experts: int = 10
    name: str = "optimal"

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        if len(counts) > self.max_experts:
            if self.fallback is None:
                raise ValueError(f"optimal search is limited to {self.max_experts} experts, got {len(counts)}")
            return self.fallback.plan(layer, counts, cached, costs, copy_free_at, gpu_free_at, cpu_free_at,
                                      arrivals)
        arrivals = {e: a for e, a in (arrivals or {}).items() if e in counts and e not in cached}
        experts = sorted(counts, key=lambda e: (-counts[e], e))
        gpu_t = {e: costs.gpu(counts[e]) for e in experts}
        cpu_t = {e: costs.cpu(counts[e], False) for e in experts}
        surcharge = {e: costs.cpu(counts[e], True) - cpu_t[e] for e in experts}
        copy_s = costs.copy()
        best = [float("inf"), (), ()]  # makespan, gpu experts, cpu experts

        def gpu_finish(on_gpu: list[int]) -> float:
            t = gpu_free_at + sum(gpu_t[e] for e in on_gpu if e in cached)
            for e in sorted((e for e in on_gpu if e in arrivals), key=lambda e: (arrivals[e], e)):
                t = max(t, arrivals[e]) + gpu_t[e]  # in flight: the link is FIFO, so they land before any copy
            ready = copy_free_at
            for e in sorted((e for e in on_gpu if e not in cached and e not in arrivals), key=lambda e: (-gpu_t[e], e)):
                ready += copy_s
                t = max(t, ready) + gpu_t[e]
            return t

        def search(i: int, on_gpu: list[int], on_cpu: list[int], cpu_sum: float, gpu_sum: float) -> None:
            cpu_end = cpu_free_at + cpu_sum + (min(surcharge[e] for e in on_cpu) if on_cpu else 0.0)
            if cpu_end >= best[0] or gpu_free_at + gpu_sum >= best[0]:
                return  # neither finish can shrink by adding experts
            if i == len(experts):
                span = max(cpu_end, gpu_finish(on_gpu))
                if span < best[0]:
                    best[:] = [span, tuple(on_gpu), tuple(on_cpu)]
                return
            e = experts[i]
            on_gpu.append(e)
            search(i + 1, on_gpu, on_cpu, cpu_sum, gpu_sum + gpu_t[e])
            on_gpu.pop()
            on_cpu.append(e)
            search(i + 1, on_gpu, on_cpu, cpu_sum + cpu_t[e], gpu_sum)
            on_cpu.pop()

        search(0, [], [], 0.0, 0.0)
        _, on_gpu, on_cpu = best
        copies = sorted((e for e in on_gpu if e not in cached and e not in arrivals), key=lambda e: (-gpu_t[e], e))
        landed = sorted((e for e in on_gpu if e in arrivals), key=lambda e: (arrivals[e], e))
        gpu_order = [e for e in on_gpu if e in cached] + landed + copies
        cpu_order = sorted(on_cpu, key=lambda e: (surcharge[e], counts[e], e))
        cpu_order = cpu_order[:1] + sorted(cpu_order[1:], key=lambda e: (counts[e], e))
        return build_plan(layer, counts, gpu_order, copies, cpu_order, costs,
                          copy_free_at, gpu_free_at, cpu_free_at, {e: arrivals[e] for e in landed})
