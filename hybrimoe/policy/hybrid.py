"""HybriMoE's dynamic intra-layer scheduler (PAPER.md section (i)): `HybridScheduler`, registered as
"hybrid" in hybrimoe.policy.schedule (see its module doc for the common call)."""

from __future__ import annotations

from hybrimoe.policy.order import by_load_desc
from hybrimoe.policy.plan import ExpertCosts, Plan, PlanTemplate, build_plan

_MEMO_LIMIT = 65536  # makespan() memo entries before it is cleared


class HybridScheduler:
    """HybriMoE's dynamic intra-layer schedule (PAPER.md section (i)).

    Priority rules fix every order:
    - PCIe copies uncached experts, highest token count first;
    - GPU runs cached experts highest count first, then copied experts as their copies finish
      (they finish in descending count order, because that is the copy order);
    - CPU runs uncached experts lowest count first; when none are left it takes cached experts,
      lowest count first, from the tail of the GPU's queue.
    What remains is the split. For each candidate number of copies c (the c most loaded uncached
    experts go over the link; the rest are the CPU's) the layer is simulated on three timelines:
    repeatedly the compute resource that becomes free earliest takes its next task by the rules;
    the CPU takes a cached expert only when it would finish it before the GPU would have reached
    and finished it (the GPU's remaining finish is known in O(1): cached work left, then the copied
    tail, whose finish from a start s is max(s + its GPU time, max_j ready_j + GPU time from j on)). A copied expert
    never starts before its copy ends. The simulation stops when every expert is placed; then the
    GPU's least loaded cached experts move to the CPU's tail one by one while that shortens the
    layer (the rules above let the GPU take them while the CPU was busy with its own queue). The
    plan with the smallest simulated makespan wins (ties: fewer copies, i.e. less PCIe traffic).
    Experts in flight (`arrivals`) head the uncached list with their arrival as ready time and no
    link time: the first splits send them to the GPU, smaller ones leave the late ones to the CPU.
    Every split is tried when U <= 16; above, a ternary search over the copy count (the makespan is
    the max of a falling CPU finish and a rising GPU finish) plus a local scan, O(A log U).
    Works for prefill and decode alike.
    """

    name = "hybrid"

    def __init__(self, full_search_limit: int = 16) -> None:
        self.full_search_limit = full_search_limit  # above: ternary search on the copy count
        self._memo: dict[tuple, float] = {}  # makespan() results (costs must not change while memoised)

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        """The best split's Plan. A layer whose memo key was planned before reuses that plan's
        template (its experts as positions in the ordered candidate list, `PlanTemplate`): the same
        key gives the same decisions and times position by position, only the expert ids differ."""
        arrivals = arrivals or {}
        lists = self._lists(counts, cached, arrivals)
        candidates = lists[1] + lists[2]  # uncached (in-flight first), then cached
        key = self._key(counts, cached, costs, copy_free_at, gpu_free_at, cpu_free_at, arrivals)
        found = self._memo.get(key)
        if found is not None and found[2] is not None:
            return found[2].instantiate(layer, counts, candidates)
        span, gpu_order, cpu_order, copies, inflight, best = self._search(
            lists, counts, costs, copy_free_at, gpu_free_at, cpu_free_at, arrivals,
            None if found is None else found[1])
        plan = build_plan(layer, counts, gpu_order, copies, cpu_order, costs,
                          copy_free_at, gpu_free_at, cpu_free_at, {e: arrivals[e] for e in inflight})
        self._remember(key, (span, best, PlanTemplate.of(plan, candidates)))
        return plan

    def makespan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
                 copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
                 arrivals: dict[int, float] | None = None) -> float:
        """`plan(...).makespan` without building the Plan (the prefetcher prices many what-ifs).
        Memoised with the best copy count (`_key`), which `plan` reuses to simulate one split only."""
        arrivals = arrivals or {}
        key = self._key(counts, cached, costs, copy_free_at, gpu_free_at, cpu_free_at, arrivals)
        found = self._memo.get(key)
        if found is None:
            result = self._search(self._lists(counts, cached, arrivals), counts, costs, copy_free_at,
                                  gpu_free_at, cpu_free_at, arrivals)
            found = self._remember(key, (result[0], result[5], None))
        return found[0]

    @staticmethod
    def _key(counts: dict[int, int], cached: set[int], costs: ExpertCosts, copy_free_at: float,
             gpu_free_at: float, cpu_free_at: float, arrivals: dict[int, float]) -> tuple:
        """What the best split depends on: the multiset of (tokens, cached / in flight with its arrival /
        neither) (expert ids only break ties between equal loads; the status is a tag, not an arrival
        value, so an arrival of 0 s is not taken for a cached expert), the free times and the costs (the key holds the
        costs object, so an id is never reused for another while memoised)."""
        return (costs, copy_free_at, gpu_free_at, cpu_free_at,
                tuple(sorted((n, 0, 0.0) if e in cached else (n, 1, arrivals[e]) if e in arrivals else (n, 2, 0.0)
                             for e, n in counts.items())))

    def _remember(self, key: tuple, value: tuple) -> tuple:
        """value: (makespan, best copy count, PlanTemplate or None)."""
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = value
        return value

    @staticmethod
    def _lists(counts: dict[int, int], cached: set[int], arrivals: dict[int, float]
               ) -> tuple[list[int], list[int], list[int]]:
        """-> (in flight by arrival, uncached = in flight + the others by load, cached by load)."""
        hits, others = [], []
        for e in counts:
            (hits if e in cached else others).append(e)
        if arrivals:
            inflight = sorted((e for e in others if e in arrivals), key=lambda e: (arrivals[e], -counts[e], e))
            others = [e for e in others if e not in arrivals]
        else:
            inflight = []
        # in-flight experts first (their copy costs the link nothing more), then the others by load
        return inflight, inflight + by_load_desc(others, counts), by_load_desc(hits, counts)

    def _search(self, lists: tuple[list[int], list[int], list[int]], counts: dict[int, int], costs: ExpertCosts,
                copy_free_at: float, gpu_free_at: float, cpu_free_at: float, arrivals: dict[int, float],
                known_best: int | None = None) -> tuple[float, list[int], list[int], list[int], list[int], int]:
        """-> (makespan, GPU order, CPU order, copies, in-flight experts, copy count) of the best split.
        `known_best`: the copy count a search with the same memo key found (the split depends on the
        key only, so the search is skipped and that split simulated once)."""
        inflight, uncached, gpu_cached = lists
        memo: dict[int, tuple[float, list[int], list[int]]] = {}
        loads = set(counts.values())  # costs are priced once per distinct token count
        g_n = {n: costs.gpu(n) for n in loads}
        c_n = {n: costs.cpu(n, False) for n in loads}
        cf_n = {n: costs.cpu(n, True) for n in loads}
        g = {e: g_n[n] for e, n in counts.items()}  # seconds, per expert
        c = {e: c_n[n] for e, n in counts.items()}
        cf = {e: cf_n[n] for e, n in counts.items()}  # as the CPU's first expert
        ready, t, copy = [arrivals[e] for e in inflight], copy_free_at, costs.copy()
        for _ in uncached[len(inflight):]:  # the link copies back to back, highest count first
            t += copy
            ready.append(t)

        def span(n_copy: int) -> float:
            if n_copy not in memo:
                memo[n_copy] = self._simulate(g, c, cf, gpu_cached, uncached, n_copy, ready,
                                              copy_free_at, gpu_free_at, cpu_free_at)
            return memo[n_copy][0]

        n = len(uncached)
        if known_best is not None:
            candidates: range = range(known_best, known_best + 1)
        elif n <= self.full_search_limit:
            candidates = range(n + 1)
        else:  # makespan(n_copy) = max(CPU finish falling, GPU finish rising): ~unimodal
            lo, hi = 0, n
            while hi - lo > 4:
                m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
                if span(m1) <= span(m2):
                    hi = m2
                else:
                    lo = m1
            candidates = range(max(0, lo - 2), min(n, hi + 2) + 1)
        best = min(candidates, key=lambda k: (span(k), k))
        makespan, gpu_order, cpu_order = memo[best]
        return makespan, gpu_order, cpu_order, uncached[len(inflight):best], inflight, best

    @staticmethod
    def _simulate(g: dict[int, float], c: dict[int, float], cf: dict[int, float], gpu_cached_desc: list[int],
                  uncached_desc: list[int], n_copy: int, ready: list[float], copy_free_at: float,
                  gpu_free_at: float, cpu_free_at: float) -> tuple[float, list[int], list[int]]:
        """Event simulation with the `n_copy` most loaded uncached experts copied
        -> (makespan, GPU order, CPU order). g/c/cf: GPU / CPU / first-CPU seconds per expert."""
        copies = uncached_desc[:n_copy]
        # GPU finish of the copied tail when it starts at s: max(s + sum p, max_j (ready_j + p_j + ... + p_last))
        tail_bound, tail_sum = copy_free_at, 0.0
        for j in range(n_copy - 1, -1, -1):
            tail_sum += g[copies[j]]
            tail_bound = max(tail_bound, ready[j] + tail_sum)
        gpu_cached = list(gpu_cached_desc)  # the GPU takes from the front, the CPU steals from the back
        cached_left = sum(g[e] for e in gpu_cached)
        cpu_queue = uncached_desc[n_copy:][::-1]  # the CPU's uncached experts, lowest count first
        gpu_order: list[int] = []
        cpu_order: list[int] = []
        t_gpu, t_cpu, qi, head, tail = gpu_free_at, cpu_free_at, 0, 0, len(gpu_cached)
        cpu_done = False
        while head < tail:
            if cpu_done or t_gpu <= t_cpu:
                e = gpu_cached[head]
                head += 1
                t_gpu += g[e]
                cached_left -= g[e]
                gpu_order.append(e)
            elif qi < len(cpu_queue):
                e = cpu_queue[qi]
                qi += 1
                t_cpu += cf[e] if not cpu_order else c[e]
                cpu_order.append(e)
            else:  # CPU idle: steal the least loaded cached expert if that ends the layer sooner
                e = gpu_cached[tail - 1]
                cpu_end = t_cpu + (cf[e] if not cpu_order else c[e])
                gpu_end = max(t_gpu + cached_left + tail_sum, tail_bound) if n_copy else t_gpu + cached_left
                if cpu_end < gpu_end:
                    tail -= 1
                    cached_left -= g[e]
                    t_cpu = cpu_end
                    cpu_order.append(e)
                else:
                    cpu_done = True
        for e in cpu_queue[qi:]:
            t_cpu += cf[e] if not cpu_order else c[e]
            cpu_order.append(e)
        # the rules let the GPU take cached experts while the CPU is busy with its own queue (or at a
        # tie at the start); hand the GPU's least loaded cached experts to the CPU while that ends the
        # layer sooner (without it: 1.5x the optimum on a 1-expert layer whose CPU time is shorter)
        def gpu_end(t: float) -> float:
            return max(t + tail_sum, tail_bound) if n_copy else t
        while gpu_order:
            e = gpu_order[-1]
            cpu_end = t_cpu + (cf[e] if not cpu_order else c[e])
            if max(gpu_end(t_gpu - g[e]), cpu_end) >= max(gpu_end(t_gpu), t_cpu):
                break
            gpu_order.pop()
            t_gpu -= g[e]
            t_cpu = cpu_end
            cpu_order.append(e)
        t_gpu = gpu_end(t_gpu)
        gpu_order += copies
        return max(t_gpu, t_cpu), gpu_order, cpu_order
