"""`hybrid-greedy`: the single-pass reading of HybriMoE's schedule simulation (PAPER.md (i)).

Three timelines (CPU, GPU, PCIe); repeatedly the resource that becomes free earliest takes its next
task by the priority rules, and no decision is revisited:
- PCIe: the most loaded uncached expert nobody has claimed. It is copied only if copy + GPU would
  finish it before the CPU would (the CPU takes uncached experts lowest count first, so it would
  reach this one last: CPU free time + CPU time of every unclaimed uncached expert). Otherwise the
  link stops for this layer (less loaded experts are even better off on the CPU).
- GPU: cached experts, highest count first; then copied experts in copy order once their copy ends
  (it waits for the next copy when none is ready).
- CPU: unclaimed uncached experts, lowest count first, unless copy + GPU would finish that expert
  sooner (then it waits for the link's decision); then it steals cached experts from the tail of
  the GPU queue while that ends before the GPU would reach and finish them.
`hybrid` (hybrid.py) uses the same rules but chooses the number of copies by simulating every
split; this variant is kept to measure what that search buys (tests print both against optimal).
"""

from __future__ import annotations

from hybrimoe.policy.plan import ExpertCosts, Plan, build_plan


class GreedyHybridScheduler:
    name = "hybrid-greedy"

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        inflight = {e: a for e, a in (arrivals or {}).items() if e in counts and e not in cached}
        if inflight:  # the single pass is defined without them: plan the rest, then add them by worth_waiting
            from hybrimoe.policy.order import worth_waiting

            rest = self.plan(layer, {e: n for e, n in counts.items() if e not in inflight}, cached, costs,
                             copy_free_at, gpu_free_at, cpu_free_at)
            landed = worth_waiting(counts, cached, costs, inflight)
            gpu = list(rest.gpu_order) + sorted(landed, key=lambda e: (landed[e], e))
            cpu = list(rest.cpu_order) + sorted(set(inflight) - set(landed), key=lambda e: (counts[e], e))
            return build_plan(layer, counts, gpu, rest.copies, cpu, costs, copy_free_at, gpu_free_at, cpu_free_at,
                              landed)
        g = {e: costs.gpu(n) for e, n in counts.items()}  # seconds per expert
        c = {e: costs.cpu(n, False) for e, n in counts.items()}
        cf = {e: costs.cpu(n, True) for e, n in counts.items()}
        gpu_cached = sorted((e for e in counts if e in cached), key=lambda e: (-counts[e], e))
        uncached = sorted((e for e in counts if e not in cached), key=lambda e: (-counts[e], e))
        lo, hi = 0, len(uncached)  # unclaimed uncached experts are uncached[lo:hi] (CPU: hi side)
        copies: list[int] = []
        ready: list[float] = []
        gpu_order: list[int] = []
        cpu_order: list[int] = []
        head, tail, next_copy = 0, len(gpu_cached), 0  # GPU queue front/back, next copied expert to run
        t_link, t_gpu, t_cpu = copy_free_at, gpu_free_at, cpu_free_at
        link_on, cpu_on = True, True

        def cpu_time(e: int) -> float:
            return cf[e] if not cpu_order else c[e]

        def gpu_end_estimate() -> float:
            t = t_gpu + sum(g[e] for e in gpu_cached[head:tail])
            for e, r in zip(copies[next_copy:], ready[next_copy:]):
                t = max(t, r) + g[e]
            return t

        while True:
            gpu_has = head < tail or next_copy < len(copies)
            link_has = link_on and lo < hi
            cpu_has = cpu_on and (lo < hi or head < tail)
            options = [(t, i) for i, (t, has) in enumerate([(t_link, link_has), (t_gpu, gpu_has), (t_cpu, cpu_has)])
                       if has]
            if not options:
                break
            _, resource = min(options)
            if resource == 0:  # PCIe: copy the most loaded unclaimed expert if that is faster
                e = uncached[lo]
                via_gpu = max(t_link + costs.copy(), gpu_end_estimate()) + g[e]
                via_cpu = t_cpu + sum(c[x] for x in uncached[lo:hi]) + (cf[e] - c[e] if not cpu_order else 0.0)
                if via_gpu < via_cpu:
                    lo += 1
                    t_link += costs.copy()
                    copies.append(e)
                    ready.append(t_link)
                else:
                    link_on = False
            elif resource == 1:  # GPU
                if head < tail:
                    e = gpu_cached[head]
                    head += 1
                    t_gpu += g[e]
                else:
                    e = copies[next_copy]
                    t_gpu = max(t_gpu, ready[next_copy]) + g[e]
                    next_copy += 1
                gpu_order.append(e)
            elif lo < hi:  # CPU: least loaded unclaimed uncached expert, unless copy + GPU is faster
                e = uncached[hi - 1]
                via_gpu = max(t_link + costs.copy(), gpu_end_estimate()) + g[e]
                if link_on and via_gpu < t_cpu + cpu_time(e):
                    t_cpu = t_link  # leave it to the link, which decides next (it is free no later)
                    continue
                hi -= 1
                t_cpu += cpu_time(e)
                cpu_order.append(e)
            else:  # CPU: steal the least loaded cached expert if that ends sooner than the GPU would
                e = gpu_cached[tail - 1]
                if t_cpu + cpu_time(e) < gpu_end_estimate():
                    tail -= 1
                    t_cpu += cpu_time(e)
                    cpu_order.append(e)
                else:
                    cpu_on = False
        return build_plan(layer, counts, gpu_order, copies, cpu_order, costs, copy_free_at, gpu_free_at,
                          cpu_free_at)
