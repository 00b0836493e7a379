"""Cache policies and slot accounting: MRS formula, victims, capacity, counters."""

import random

import pytest

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cache_policy import LRUPolicy, MRSPolicy, StaticPolicy, make_policy
from hybrimoe.policy.cache_state import CacheState


def _softmax(rng: random.Random, n: int) -> list[float]:
    x = [rng.gauss(0, 2) for _ in range(n)]
    m = max(x)
    e = [2.718281828 ** (v - m) for v in x]
    return [v / sum(e) for v in e]


def test_mrs_update_follows_the_formula_exactly():
    rng = random.Random(0)
    num_experts, top_k, alpha = 16, 2, 0.5
    mrs = MRSPolicy(top_k=top_k, alpha=alpha)
    reference = [0.0] * num_experts
    for step in range(520):  # long enough to trigger the lazy-decay renormalisation (0.5**500)
        s = _softmax(rng, num_experts)
        top = sorted(range(num_experts), key=lambda e: -s[e])[: 2 * top_k]
        top_p = [s[e] if e in top else 0.0 for e in range(num_experts)]
        reference = [alpha * t + (1 - alpha) * r for t, r in zip(top_p, reference)]
        mrs.observe(3, s, top[:top_k])
        if step % 50 == 0 or step > 495:
            for e in range(num_experts):
                assert mrs.priority(3, e) == pytest.approx(reference[e], rel=1e-9, abs=1e-300)


def test_mrs_without_scores_uses_the_selected_weights():
    mrs = MRSPolicy(top_k=2, alpha=0.25)
    mrs.observe(0, None, [4, 7], [0.6, 0.3])
    mrs.observe(0, None, [4, 1], [0.5, 0.2])
    assert mrs.priority(0, 4) == pytest.approx(0.25 * 0.5 + 0.75 * 0.25 * 0.6)
    assert mrs.priority(0, 7) == pytest.approx(0.75 * 0.25 * 0.3)
    assert mrs.priority(0, 1) == pytest.approx(0.25 * 0.2)
    assert mrs.victim([(0, 4), (0, 7), (0, 1)]) == (0, 1)


def _random_run(policy_name: str, per_layer: bool, seed: int):
    rng = random.Random(seed)
    layers, experts, top_k = 4, 8, 2
    policy = make_policy(policy_name, top_k=top_k, hot=[(0, 0), (1, 1)], frequency={})
    budget = {l: 2 for l in range(layers)} if per_layer else None
    cache = CacheState(capacity=10, policy=policy, expert_bytes=100, layer_capacity=budget)
    cache.preload([(0, 0), (1, 1)])
    activations = 0
    for _ in range(300):
        for layer in range(layers):
            selected = rng.sample(range(experts), top_k)
            policy.observe(layer, _softmax(rng, experts), selected)
            keys = [(layer, e) for e in selected]
            for key in keys:
                cache.access(key)
                activations += 1
            cache.pin(keys)
            for key in keys:
                resident_pinned = {k for k in keys if k in cache}
                cache.insert(key, protect=keys)
                assert resident_pinned <= cache.resident()  # a pinned expert is never evicted
            cache.unpin_all()
            assert len(cache) == 2 + cache.inserts - cache.evictions  # (CacheState asserts the capacity itself)
            if per_layer:
                assert all(len(cache.cached_experts(l)) <= 2 for l in range(layers))
    return cache, activations


@pytest.mark.parametrize("name", ["mrs", "lru", "lfu", "static"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_cache_never_exceeds_capacity_and_counts_every_activation(name, per_layer):
    cache, activations = _random_run(name, per_layer, seed=1)
    assert cache.hits + cache.misses == activations
    assert cache.bytes_in == 100 * cache.inserts
    if name == "static":
        assert cache.inserts == 0 or cache.resident() >= {(0, 0), (1, 1)}


def test_pinned_experts_are_never_evicted():
    cache = CacheState(capacity=2, policy=LRUPolicy())
    cache.insert((0, 1))
    cache.insert((0, 2))
    cache.pin([(0, 1), (0, 2)])
    assert not cache.insert((0, 3))  # nothing evictable
    cache.unpin_all()
    cache.pin([(0, 1)])
    assert cache.insert((0, 3)) and (0, 1) in cache and (0, 2) not in cache


def test_lru_evicts_least_recently_used():
    cache = CacheState(capacity=3, policy=LRUPolicy())
    for e in (1, 2, 3):
        cache.insert((0, e))
    assert cache.access((0, 1))
    cache.insert((0, 4))
    assert cache.resident() == {(0, 1), (0, 3), (0, 4)}


def test_static_cache_never_evicts_its_hot_set():
    hot = [(0, 0), (0, 1)]
    cache = CacheState(capacity=2, policy=StaticPolicy(hot=hot))
    cache.preload(hot)
    assert not cache.insert((0, 5))
    assert cache.resident() == set(hot)


@pytest.mark.parametrize("name,alpha", [("mrs", 0.5), ("mrs", 1.0), ("lru", None)])
@pytest.mark.parametrize("per_layer", [False, True])
def test_fast_victim_paths_agree_with_the_definition(name, alpha, per_layer):
    """The incremental victim search (MRS: one min over per-layer heads; LRU: the touch order) equals
    the brute-force minimum over the candidates, with pins, random protected sets (often holding a
    layer's lowest resident), per-layer budgets and MRS's scale folding (alpha 1 folds every step)."""
    rng = random.Random(4)
    policy = make_policy(name, top_k=2, **({} if alpha is None else {"alpha": alpha}))
    cache = CacheState(capacity=12, policy=policy,
                       layer_capacity={layer: 3 for layer in range(4)} if per_layer else None)
    for _ in range(300):
        layer = rng.randrange(4)
        selected = rng.sample(range(8), 2)
        policy.observe(layer, _softmax(rng, 8), selected)
        cache.pin((layer, e) for e in selected)
        for e in selected:
            cache.access((layer, e))
            cache.insert((layer, e), protect={(layer, x) for x in selected})
        residents = sorted(cache.resident())
        protect = set(rng.sample(residents, min(len(residents), rng.randrange(4))))
        if residents and rng.random() < 0.5:  # protect some layer's lowest resident
            protect.add(min(residents, key=lambda k: (policy.score(k), k)))
        for probe in range(4):
            view = cache._candidates(probe, protect)
            assert policy.victim(view) == policy.victim(list(view))
        cache.unpin_all()


def test_unknown_policy_lists_known_names():
    with pytest.raises(ConfigError, match="mrs"):
        make_policy("arc")


@pytest.mark.parametrize("name", ["mrs", "lru", "lfu"])
def test_miss_filling_admits_a_just_used_expert(name):
    """fill_misses inserts with by_value=True after the router's `observe`: an expert that just
    missed must be able to displace a resident nobody used (LRU once scored a never-resident expert
    0 and refused it forever, so its 'LRU' cache stayed the initial hot set)."""
    policy = make_policy(name, top_k=1)
    cache = CacheState(capacity=2, policy=policy)
    cache.preload([(0, 0), (0, 1)])
    for _ in range(3):
        policy.observe(0, None, [1], [1.0])
        assert cache.access((0, 1))
    policy.observe(0, None, [5], [1.0])
    assert not cache.access((0, 5))
    assert cache.insert((0, 5), by_value=True)
    assert cache.resident() == {(0, 1), (0, 5)}
