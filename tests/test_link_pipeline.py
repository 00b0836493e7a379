"""The copy pipeline (policy/link.py, policy/pipeline.py): in-flight arrivals, staging, protection,
and schedulers that know when a prefetched expert lands."""

import pytest

from hybrimoe.policy.cache_policy import make_policy
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.link import LinkQueue
from hybrimoe.policy.pipeline import CopyPipeline
from hybrimoe.policy.plan import LinearCosts, build_plan
from hybrimoe.policy.prefetch import get_prefetcher
from hybrimoe.policy.schedule import get_scheduler

# CPU 0.1 s per token, GPU 0.2 s per expert, copy 1 s
COSTS = LinearCosts(cpu_per_token=0.1, gpu_fixed=0.2, copy_seconds=1.0)
HYBRID = get_scheduler("hybrid")


def _pipeline(cache: CacheState, staging: int = 2, prefetch: str = "impact") -> CopyPipeline:
    return CopyPipeline(cache, lambda layer: COSTS, [0, 1, 2, 3], horizon=2, prefetcher=get_prefetcher(prefetch),
                        staging_slots=staging, confidence_prior=(1e9, 0.0))  # predictions trusted: mechanics only


def test_build_plan_starts_an_in_flight_expert_after_its_arrival():
    plan = build_plan(0, {3: 1, 4: 1}, [3, 4], [4], [], COSTS, copy_free_at=0.5, arrivals={3: 0.4})
    gpu = {t.expert: t for t in plan.tasks_on("gpu")}
    assert gpu[3].start == pytest.approx(0.4) and gpu[4].start == pytest.approx(1.5)  # copy 0.5 -> 1.5
    with pytest.raises(AssertionError):  # an expert in flight is never copied again
        build_plan(0, {3: 1}, [3], [3], [], COSTS, arrivals={3: 0.4})


@pytest.mark.parametrize("name", ["hybrid", "optimal", "hybrid-greedy", "cpu-on-miss", "fiddler-prefill",
                                  "gpu-only"])
def test_an_expert_in_flight_runs_on_the_gpu_when_it_lands_in_time_else_on_the_cpu(name):
    """10 tokens: CPU 1.0 s. Landing at 0.3 s the GPU finishes at 0.5 s; landing at 5 s the CPU is
    sooner (every scheduler but gpu-only, which never uses the CPU). It is never copied again."""
    scheduler = get_scheduler(name)
    early = scheduler.plan(0, {7: 10}, set(), COSTS, arrivals={7: 0.3})
    assert early.gpu_order == (7,) and early.copies == () and early.makespan == pytest.approx(0.5)
    late = scheduler.plan(0, {7: 10}, set(), COSTS, arrivals={7: 5.0})
    assert late.copies == ()
    if name == "gpu-only":
        assert late.makespan == pytest.approx(5.2)
    else:
        assert late.cpu_order == (7,) and late.makespan == pytest.approx(1.0)


def test_view_splits_landed_and_in_flight_and_reports_when_the_link_frees():
    cache = CacheState(capacity=4, policy=make_policy("lru"))
    pipe = _pipeline(cache)
    cache.insert((1, 0))
    pipe.link.issue((1, 0), "prefetch", "slot", now=0.0, seconds=1.0)  # lands at 1.0
    pipe.link.issue((1, 1), "prefetch", "staging", now=0.0, seconds=1.0)  # lands at 2.0
    cache.insert((1, 2))  # resident long ago
    view = pipe.view(1, {0: 1, 1: 1, 2: 1, 3: 1}, now=0.5)
    assert view.cached == {2} and view.arrivals == pytest.approx({0: 0.5, 1: 1.5})
    assert view.copy_free_at == pytest.approx(1.5)
    later = pipe.view(1, {0: 1, 1: 1, 3: 1}, now=2.5)
    assert later.cached == {0, 1} and later.arrivals == {} and later.copy_free_at == 0.0
    assert pipe.layer_done(1) == [(1, 1)] and pipe.link.staging_free() == 2


def _fill(cache: CacheState, keys) -> None:
    for key in keys:
        assert cache.insert(key)


def test_prefetch_at_a_full_cache_evicts_neither_the_current_layer_nor_earlier_prefetches():
    """Cache exactly at capacity (4): a prefetch evicts an unprotected expert; once every resident is
    protected (this layer's experts, prefetched experts not yet used), prefetches go to staging
    buffers, and when those are taken too nothing more is copied. The cache never overfills."""
    cache = CacheState(capacity=4, policy=make_policy("lru"))
    _fill(cache, [(0, 0), (0, 1), (3, 5), (3, 6)])
    pipe = _pipeline(cache, staging=1)
    current = {(0, 0), (0, 1)}
    cache.pin(current)
    plan = HYBRID.plan(0, {0: 1, 1: 1}, {0, 1}, COSTS)  # both cached: 0.4 s on the GPU
    predicted = {1: {2: 30, 3: 30}, 2: {4: 30, 5: 30}}  # CPU 3 s each: every prefetch pays off
    copies = pipe.idle(0, plan, 0.0, predicted, next_gap=10.0, gap=lambda f: 0.0, scheduler=HYBRID,
                       current=current, counts={0: 1, 1: 1})
    dests = [(c.key, c.dest) for c in copies]
    assert len(cache) == 4 and current <= cache.resident()
    assert [d for _, d in dests] == ["slot", "slot", "staging"]  # the two layer-3 experts made room
    assert {k for k, _ in dests[:2]} <= cache.resident() and not {(3, 5), (3, 6)} & cache.resident()
    assert len(copies) == 3  # no 4th: every slot protected and the staging buffer taken
    for a, b in zip(copies, copies[1:]):
        assert b.start == pytest.approx(a.end)  # back to back on the link
    # a later layer's on-demand copy may not evict the prefetched experts before they are used
    assert not cache.insert((2, 7), protect=pipe.pending)


def test_copies_may_cross_the_layer_boundary_but_must_start_before_it():
    cache = CacheState(capacity=8, policy=make_policy("lru"))
    pipe = _pipeline(cache)
    plan = HYBRID.plan(0, {0: 1}, {0}, COSTS)  # 0.2 s
    predicted = {1: {e: 30 for e in range(6)}}
    copies = pipe.idle(0, plan, 0.0, predicted, next_gap=2.0, gap=lambda f: 0.0, scheduler=HYBRID,
                       current={(0, 0)}, counts={0: 1})
    window_end = 0.2 + 2.0
    assert [c.start for c in copies] == pytest.approx([0.0, 1.0, 2.0])  # 2.0 < 2.2: starts inside
    assert copies[-1].end > window_end  # and is still in flight when layer 1 starts
    # the next-layer-score prefetcher (the public code) never crosses: its copies end inside the window
    pipe2 = _pipeline(CacheState(capacity=8, policy=make_policy("lru")), prefetch="next-layer-score")
    copies2 = pipe2.idle(0, plan, 0.0, predicted, next_gap=2.0, gap=lambda f: 0.0, scheduler=HYBRID,
                         current={(0, 0)}, counts={0: 1})
    assert len(copies2) == 2 and copies2[-1].end <= window_end


def test_link_queue_is_fifo_and_counts_staging():
    link = LinkQueue(staging_slots=1)
    a = link.issue((0, 1), "demand", "transient", now=1.0, seconds=0.5)
    b = link.issue((2, 3), "prefetch", "staging", now=1.2, seconds=0.5)
    assert (a.start, a.end, b.start, b.end) == pytest.approx((1.0, 1.5, 1.5, 2.0))
    assert link.arrival((0, 1)) is None and link.arrival((2, 3)) == pytest.approx(2.0)
    assert link.staging_free() == 0
    with pytest.raises(AssertionError):
        link.issue((2, 4), "prefetch", "staging", now=1.2, seconds=0.5)
    assert link.copies == {"demand": 1, "prefetch": 1, "fill": 0}


def test_a_prefetched_expert_stays_protected_until_its_layer_has_run():
    """Prefetched at layer 0 for layer 2; at layer 1 the cache is full and LRU would pick it (least
    recently used), but it is still waiting for layer 2: another expert goes instead."""
    cache = CacheState(capacity=2, policy=make_policy("lru"))
    _fill(cache, [(0, 0), (3, 9)])
    pipe = _pipeline(cache, staging=0)
    plan0 = HYBRID.plan(0, {0: 1}, {0}, COSTS)
    copies = pipe.idle(0, plan0, 0.0, {1: {}, 2: {4: 30}}, next_gap=5.0, gap=lambda f: 0.0, scheduler=HYBRID,
                       current={(0, 0)}, counts={0: 1})
    assert [(c.key, c.dest) for c in copies] == [((2, 4), "slot")] and (3, 9) not in cache
    pipe.layer_done(0)
    cache.access((0, 0))  # (0, 0) used again: (2, 4) is now the least recently used
    plan1 = HYBRID.plan(1, {1: 1}, set(), COSTS)
    copies = pipe.idle(1, plan1, 5.0, {2: {}, 3: {5: 30}}, next_gap=5.0, gap=lambda f: 0.0, scheduler=HYBRID,
                       current={(1, 1)}, counts={1: 1})
    assert [(c.key, c.dest) for c in copies] == [((3, 5), "slot")]
    assert (2, 4) in cache and (0, 0) not in cache
    pipe.layer_done(1)
    pipe.layer_done(2)
    assert not pipe.pending - {(3, 5)}


def test_in_prefill_a_prefetch_never_evicts_it_takes_a_free_slot_or_a_staging_buffer():
    """As on-demand copies in prefill: evicting for a prompt's stream of copies drops experts that later
    layers of the same forward need (they are beyond the look-ahead, so nothing protects them)."""
    cache = CacheState(capacity=3, policy=make_policy("lru"))
    _fill(cache, [(0, 0), (3, 5)])  # one free slot
    pipe = _pipeline(cache, staging=1)
    plan = HYBRID.plan(0, {0: 8}, {0}, COSTS)
    predicted = {1: {2: 30, 3: 30, 4: 30}, 2: {}}
    copies = pipe.idle(0, plan, 0.0, predicted, next_gap=10.0, gap=lambda f: 0.0, scheduler=HYBRID,
                       current={(0, 0)}, counts={0: 8}, prefill=True)
    assert [c.dest for c in copies] == ["slot", "staging"]  # the free slot, then the staging buffer, no more
    assert (3, 5) in cache and len(cache) == 3


def test_prefetch_gains_are_weighted_by_how_often_predictions_were_used():
    """A copy that would delay layer 1's own copy pays off only if the prediction is likely right:
    with a record of unused prefetches (confidence ~0) nothing is copied; trusted, it is."""
    def run(prior):
        cache = CacheState(capacity=8, policy=make_policy("lru"))
        pipe = CopyPipeline(cache, lambda layer: COSTS, [0, 1, 2, 3], horizon=2,
                            prefetcher=get_prefetcher("impact"), confidence_prior=prior)
        plan = HYBRID.plan(0, {0: 1}, {0}, COSTS)
        predicted = {1: {1: 30}, 2: {2: 30}}  # layer 1 will copy its expert itself at 0.25 s
        return pipe.idle(0, plan, 0.0, predicted, next_gap=0.05, gap=lambda f: 0.05, scheduler=HYBRID,
                         current={(0, 0)}, counts={0: 1})
    assert [c.key for c in run((1e9, 0.0))]
    assert run((0.0, 1e9)) == []
