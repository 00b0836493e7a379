"""Schedulers: the paper's worked example, plan invariants, hybrid vs exhaustive optimum."""

import random
import time

import pytest

from hybrimoe.errors import ConfigError
from hybrimoe.policy.plan import LinearCosts, Plan
from hybrimoe.policy.schedule import SCHEDULERS, get_scheduler


def _random_layer(rng: random.Random, max_experts: int = 10):
    counts = {e: rng.randint(1, 64) for e in rng.sample(range(64), rng.randint(1, max_experts))}
    cached = {e for e in counts if rng.random() < 0.5}
    costs = LinearCosts(cpu_per_token=rng.uniform(0.05, 0.5), gpu_fixed=rng.uniform(0.2, 1.0),
                        copy_seconds=rng.uniform(0.5, 5.0), cpu_fixed=rng.uniform(0.0, 0.5),
                        cpu_first_extra=rng.uniform(0.0, 0.5), gpu_per_token=rng.uniform(0.0, 0.02))
    return counts, cached, costs


def _check_plan(plan: Plan, counts, cached, costs, copy_free_at=0.0, gpu_free_at=0.0, cpu_free_at=0.0):
    assert sorted(plan.gpu_order + plan.cpu_order) == sorted(counts)  # every expert exactly once
    assert set(plan.copies) <= set(plan.gpu_order)
    assert set(plan.gpu_order) - set(plan.copies) <= cached  # a GPU expert is cached or copied
    assert not set(plan.copies) & cached
    copy_end = {t.expert: t.end for t in plan.tasks_on("copy")}
    free = {"copy": copy_free_at, "gpu": gpu_free_at, "cpu": cpu_free_at}
    for resource in ("cpu", "gpu", "copy"):
        tasks = plan.tasks_on(resource)
        for a, b in zip(tasks, tasks[1:]):
            assert a.end <= b.start + 1e-12  # one task at a time
        for t in tasks:
            assert t.start >= free[resource] - 1e-12 and t.end >= t.start
    for t in plan.tasks_on("gpu"):
        assert t.start >= copy_end.get(t.expert, 0.0) - 1e-12  # no compute before the copy lands
    assert plan.makespan == pytest.approx(max([t.end for t in plan.tasks if t.resource != "copy"]
                                              + [gpu_free_at, cpu_free_at]))


def test_paper_example_cpu_takes_cached_low_load_while_gpu_runs_copied_high_load():
    # transfer = 3 units, GPU time constant (2), CPU time = load; experts 0 (load 1) and 1 (load 5)
    # cached, expert 2 (load 8) not cached.
    costs = LinearCosts(cpu_per_token=1.0, gpu_fixed=2.0, copy_seconds=3.0)
    counts, cached = {0: 1, 1: 5, 2: 8}, {0, 1}
    plan = get_scheduler("hybrid").plan(0, counts, cached, costs)
    assert plan.cpu_order == (0,)  # the CPU computes the cached, lightly loaded expert
    assert plan.copies == (2,) and plan.gpu_order == (1, 2)  # the GPU runs the copied heavy one
    assert plan.makespan == pytest.approx(5.0)
    assert get_scheduler("optimal").plan(0, counts, cached, costs).makespan == pytest.approx(5.0)
    assert get_scheduler("gpu-only").plan(0, counts, cached, costs).makespan == pytest.approx(6.0)
    assert get_scheduler("cpu-on-miss").plan(0, counts, cached, costs).makespan == pytest.approx(8.0)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_plans_are_consistent(name):
    rng = random.Random(1)
    scheduler = get_scheduler(name)
    for _ in range(60):
        counts, cached, costs = _random_layer(rng)
        free = dict(copy_free_at=rng.uniform(0, 2), gpu_free_at=rng.uniform(0, 1), cpu_free_at=rng.uniform(0, 1))
        _check_plan(scheduler.plan(3, counts, cached, costs, **free), counts, cached, costs, **free)


def _ratios_to_optimal(name: str, layers: int = 400, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    scheduler, optimal = get_scheduler(name), get_scheduler("optimal")
    ratios = []
    for _ in range(layers):
        counts, cached, costs = _random_layer(rng)
        ratios.append(scheduler.plan(0, counts, cached, costs).makespan / optimal.plan(0, counts, cached, costs).makespan)
    ratios.sort()
    print("\n%s/optimal makespan: median %.3f, p95 %.3f, p99 %.3f, max %.3f, within 5%%: %.1f%%, within 10%%: %.1f%%"
          % (name, ratios[layers // 2], ratios[int(0.95 * layers) - 1], ratios[int(0.99 * layers) - 1], ratios[-1],
             100 * sum(r <= 1.05 for r in ratios) / layers, 100 * sum(r <= 1.10 for r in ratios) / layers))
    assert ratios[0] >= 1.0 - 1e-9  # nothing beats the exhaustive optimum
    return ratios


def test_hybrid_within_5_percent_of_optimal_on_95_percent_of_layers_and_never_beyond_1_2x():
    """400 random layers (1-10 experts, random loads, cache state and affine costs). Measured:
    99.2% within 5%, max 1.075. Caught: the first CPU expert's penalty ignored by the planner
    (max 1.5x); no hand-over of the GPU's cached experts to a faster CPU (1.499x on a 1-expert layer)."""
    ratios = _ratios_to_optimal("hybrid")
    assert sum(r <= 1.05 for r in ratios) / len(ratios) >= 0.95
    assert ratios[-1] <= 1.2


@pytest.mark.parametrize("name", ["hybrid", "hybrid-greedy"])
def test_the_first_cpu_experts_penalty_decides_the_split(name):
    """One uncached expert of 1 token: on the CPU it is the layer's first CPU expert, 1 + 1 = 2 s;
    copied and run on the GPU, 1.2 + 0.5 = 1.7 s. A planner that ignores the penalty sees 1 s on the
    CPU and keeps it there (2 s). With a cached expert the GPU is busy with (0.9 s) the copy still wins."""
    costs = LinearCosts(cpu_per_token=1.0, gpu_fixed=0.5, copy_seconds=1.2, cpu_first_extra=1.0)
    plan = get_scheduler(name).plan(0, {7: 1}, set(), costs)
    assert plan.copies == (7,) and plan.cpu_order == () and plan.makespan == pytest.approx(1.7)
    plan = get_scheduler(name).plan(0, {7: 1, 3: 9}, {3}, costs)
    assert plan.copies == (7,) and plan.makespan == pytest.approx(1.7)


def test_hybrid_greedy_honest_figures():
    """The paper's single greedy pass cannot meet the 5% / 1.2x target: it commits to copy/CPU
    decisions as it goes. Measured on the same 400 layers: 86.0% within 5%, 17 layers above 1.2x,
    max 1.499 (docs/BENCH.md); these bounds pin that figure so a regression shows."""
    ratios = _ratios_to_optimal("hybrid-greedy")
    assert sum(r <= 1.05 for r in ratios) / len(ratios) >= 0.85
    assert sum(r > 1.2 for r in ratios) <= 17 and ratios[-1] <= 1.5


def test_optimal_is_never_beaten_and_fast_for_ten_experts():
    rng = random.Random(2)
    others = [get_scheduler(n) for n in SCHEDULERS if n != "optimal"]
    optimal = get_scheduler("optimal")
    for _ in range(100):
        counts, cached, costs = _random_layer(rng)
        best = optimal.plan(0, counts, cached, costs).makespan
        assert all(s.plan(0, counts, cached, costs).makespan >= best - 1e-9 for s in others)
    counts = {e: 5 * e + 1 for e in range(10)}
    start = time.perf_counter()
    optimal.plan(0, counts, {0, 3, 7}, LinearCosts(cpu_per_token=0.1, gpu_fixed=0.5, copy_seconds=1.5))
    assert time.perf_counter() - start < 0.5


def test_hybrid_handles_prefill_sized_layers():
    rng = random.Random(3)
    counts = {e: rng.randint(1, 300) for e in range(64)}
    cached = set(range(0, 64, 3))
    costs = LinearCosts(cpu_per_token=0.01, gpu_fixed=0.05, copy_seconds=0.2, gpu_per_token=0.0005)
    plan = get_scheduler("hybrid").plan(0, counts, cached, costs)
    _check_plan(plan, counts, cached, costs)
    for name in ("gpu-only", "cpu-on-miss"):
        assert plan.makespan <= get_scheduler(name).plan(0, counts, cached, costs).makespan + 1e-12


def test_unknown_scheduler_lists_known_names():
    with pytest.raises(ConfigError, match="hybrid.*optimal"):
        get_scheduler("fastest")


def test_hybrid_search_on_large_layers_matches_the_full_scan():
    rng = random.Random(5)
    fast, full = get_scheduler("hybrid"), type(get_scheduler("hybrid"))(full_search_limit=10**6)
    ratios = []
    for _ in range(100):
        counts = {e: max(1, int(rng.paretovariate(1.2) * 5)) for e in range(rng.randint(17, 100))}
        cached = {e for e in counts if rng.random() < 0.4}
        costs = LinearCosts(cpu_per_token=rng.uniform(0.005, 0.05), gpu_fixed=rng.uniform(0.02, 0.1),
                            copy_seconds=rng.uniform(0.05, 0.5), cpu_first_extra=rng.uniform(0, 0.05))
        ratios.append(fast.plan(0, counts, cached, costs).makespan / full.plan(0, counts, cached, costs).makespan)
    assert min(ratios) >= 1.0 - 1e-12  # the full scan is the better of the two by construction
    assert sum(r <= 1.01 for r in ratios) >= 95


@pytest.mark.parametrize("name", ["hybrid", "hybrid-greedy"])
def test_hybrid_plans_follow_the_papers_priority_rules(name):
    """PAPER.md (i): PCIe copies the most loaded uncached experts, highest count first; the GPU runs
    its cached experts highest count first, then the copied ones in copy (descending) order; the CPU
    runs uncached experts lowest count first, then cached ones lowest count first, and the cached
    experts it takes are the least loaded ones."""
    rng = random.Random(7)
    scheduler = get_scheduler(name)
    stole = copied = 0
    for _ in range(300):
        counts, cached, costs = _random_layer(rng, max_experts=12)
        plan = scheduler.plan(0, counts, cached, costs)
        load = [counts[e] for e in plan.copies]
        uncached = sorted((counts[e] for e in counts if e not in cached), reverse=True)
        assert load == uncached[: len(load)]  # the most loaded uncached experts, highest first
        on_gpu_cached = [e for e in plan.gpu_order if e in cached]
        assert list(plan.gpu_order) == on_gpu_cached + list(plan.copies)  # cached first, then copies
        assert [counts[e] for e in on_gpu_cached] == sorted((counts[e] for e in on_gpu_cached), reverse=True)
        cpu_uncached = [counts[e] for e in plan.cpu_order if e not in cached]
        cpu_cached = [counts[e] for e in plan.cpu_order if e in cached]
        assert [counts[e] for e in plan.cpu_order] == cpu_uncached + cpu_cached  # uncached before cached
        assert cpu_uncached == sorted(cpu_uncached) and cpu_cached == sorted(cpu_cached)
        if cpu_cached and on_gpu_cached:  # the CPU steals from the light end of the GPU's queue
            assert max(cpu_cached) <= min(counts[e] for e in on_gpu_cached)
        stole += bool(cpu_cached)
        copied += bool(plan.copies)
    assert stole > 10 and copied > 10  # both rules were exercised


def test_hybrid_memoised_plans_equal_fresh_plans():
    """The hybrid scheduler reuses a plan template for layers with the same memo key (the multiset of
    (tokens, status), free times, costs): each reused plan must equal, field by field, the plan a
    fresh scheduler computes for the same layer. Few distinct loads and free times, random expert
    ids, cached sets and arrivals, so most calls hit the memo with other ids."""
    rng = random.Random(11)
    costs = LinearCosts(cpu_per_token=1.0, gpu_fixed=0.3, copy_seconds=1.7, cpu_fixed=0.5, cpu_first_extra=0.4,
                        gpu_per_token=0.05)
    shared = get_scheduler("hybrid")
    hits = 0
    for _ in range(600):
        experts = rng.sample(range(64), rng.randint(1, 6))
        counts = {e: rng.choice([1, 1, 2, 5]) for e in experts}
        cached = {e for e in experts if rng.random() < 0.4}
        # arrivals of 0 s or in the past occur in the prefetcher's what-ifs: they must not pass for cached
        arrivals = {e: rng.choice([0.0, -0.3, 0.5, 2.0]) for e in experts if e not in cached and rng.random() < 0.3}
        free = rng.choice([0.0, 0.0, 1.0])
        key = shared._key(counts, cached, costs, free, 0.0, 0.0, arrivals)
        hits += key in shared._memo and shared._memo[key][2] is not None
        memoised = shared.plan(3, counts, cached, costs, copy_free_at=free, arrivals=arrivals)
        fresh = get_scheduler("hybrid").plan(3, counts, cached, costs, copy_free_at=free, arrivals=arrivals)
        assert memoised == fresh
    assert hits > 100  # the reuse path ran
