"""Inter-layer prefetchers: which experts of later layers to copy while the link would idle.

`Prefetcher.step(layer, predicted, cache, link_idle_seconds, costs, scheduler, protect)` is called
once per MoE layer after its plan is fixed, with the predicted per-expert token counts of the next
layers {future layer: {expert: tokens}}, the seconds the link has free before it is needed again,
`costs(layer) -> ExpertCosts`, the scheduler that will plan those layers, and `protect`, keys that
must not be evicted (the current layer's experts are pinned in `cache` as well). It returns the
keys to copy now, in order; the caller copies them only into that idle time, so an on-demand copy
is never delayed, and inserts them with `cache.insert(key, protect)`, which never overfills.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.plan import ExpertCosts, ExpertKey
from hybrimoe.policy.schedule import Scheduler

CostsFor = Callable[[int], ExpertCosts]


class Prefetcher(Protocol):
    name: str

    def step(self, layer: int, predicted: dict[int, dict[int, int]], cache: CacheState,
             link_idle_seconds: float, costs: CostsFor, scheduler: Scheduler,
             protect: set[ExpertKey] | None = None) -> list[ExpertKey]: ...


def _slots(link_idle_seconds: float, costs: CostsFor, layer: int) -> int:
    """Whole expert copies that fit in the idle window."""
    copy = costs(layer).copy()
    return int(math.floor(link_idle_seconds / copy + 1e-9)) if copy > 0 else 0


def _protected(predicted: dict[int, dict[int, int]], cache: CacheState, protect: set[ExpertKey] | None
               ) -> set[ExpertKey]:
    """Caller's keys plus every predicted expert already cached (do not evict what we will use)."""
    keep = set(protect or ())
    for f, counts in predicted.items():
        keep.update((f, e) for e in counts if (f, e) in cache)
    return keep


class NoPrefetch:
    name = "none"

    def step(self, layer: int, predicted: dict[int, dict[int, int]], cache: CacheState,
             link_idle_seconds: float, costs: CostsFor, scheduler: Scheduler,
             protect: set[ExpertKey] | None = None) -> list[ExpertKey]:
        return []


class ImpactPrefetcher:
    """Impact-driven prefetching (PAPER.md (ii)).

    For each predicted-but-uncached candidate (f, e), its impact is the reduction of layer f's
    simulated makespan (the scheduler's plan on the predicted counts) if e were already cached.
    Candidates are taken greedily by impact (highest first); after each pick that layer's impacts
    are recomputed with the pick counted as cached, so two experts whose gains overlap are not both
    over-valued. Only candidates with positive impact, that the cache can admit without evicting a
    protected or pinned expert, and that fit in the idle link time are returned. To bound the cost
    in prefill, only the `max_candidates` most loaded candidates per layer are evaluated, and layers
    with more than `recompute_limit` activated experts are not re-ranked after a pick.
    """

    name = "impact"

    def __init__(self, max_candidates: int = 8, recompute_limit: int = 16) -> None:
        self.max_candidates = max_candidates  # most loaded candidates evaluated per future layer
        self.recompute_limit = recompute_limit  # re-rank a layer after a pick only up to this many experts

    def step(self, layer: int, predicted: dict[int, dict[int, int]], cache: CacheState,
             link_idle_seconds: float, costs: CostsFor, scheduler: Scheduler,
             protect: set[ExpertKey] | None = None) -> list[ExpertKey]:
        slots = _slots(link_idle_seconds, costs, layer)
        if slots <= 0 or not predicted:
            return []
        keep = _protected(predicted, cache, protect)
        cached = {f: cache.cached_experts(f) & set(c) for f, c in predicted.items()}
        impacts: dict[int, list[tuple[float, int]]] = {f: self._impacts(f, predicted[f], cached[f], costs,
                                                                       scheduler) for f in predicted}
        chosen: list[ExpertKey] = []
        while len(chosen) < slots:
            best = max(((gain, -f, e) for f, lst in impacts.items() for gain, e in lst[:1]), default=None)
            if best is None or best[0] <= 0.0:
                break
            f, e = -best[1], best[2]
            key = (f, e)
            if cache.can_insert(key, keep | set(chosen)) and self._fits(cache, chosen, key, keep):
                chosen.append(key)
                cached[f].add(e)
                if len(predicted[f]) <= self.recompute_limit:
                    impacts[f] = self._impacts(f, predicted[f], cached[f], costs, scheduler)
                else:
                    impacts[f] = [(g, x) for g, x in impacts[f] if x != e]
            else:
                impacts[f] = [(g, x) for g, x in impacts[f] if x != e]
        return chosen

    def _impacts(self, f: int, counts: dict[int, int], cached: set[int], costs: CostsFor,
                 scheduler: Scheduler) -> list[tuple[float, int]]:
        """[(makespan reduction in seconds, expert)], best first, for uncached predicted experts."""
        if not counts:
            return []
        c = costs(f)
        base = scheduler.plan(f, counts, cached, c).makespan
        cands = sorted((e for e in counts if e not in cached), key=lambda e: (-counts[e], e))
        out = [(base - scheduler.plan(f, counts, cached | {e}, c).makespan, e)
               for e in cands[: self.max_candidates]]
        return sorted(out, key=lambda x: (-x[0], x[1]))

    @staticmethod
    def _fits(cache: CacheState, chosen: list[ExpertKey], key: ExpertKey, keep: set[ExpertKey]) -> bool:
        """Enough free or evictable slots for every chosen key plus this one, so that inserting
        them in order never makes one chosen key evict another."""
        per_layer = cache.layer_capacity is not None
        same = lambda k: not per_layer or k[0] == key[0]  # noqa: E731  (keys sharing the budget)
        wanted = sum(1 for k in chosen if same(k)) + 1
        used = len(cache.cached_experts(key[0])) if per_layer else len(cache)
        blocked = sum(1 for k in keep | cache.pinned() if k in cache and same(k))
        return wanted <= cache.limit(key[0]) - used + (used - blocked)


class NextLayerScorePrefetcher:
    """What the public HybriMoE code does: prefetch the next layer's predicted experts with the
    highest cache score (the policy's `score`, e.g. MRS priority; ties by predicted count)."""

    name = "next-layer-score"

    def step(self, layer: int, predicted: dict[int, dict[int, int]], cache: CacheState,
             link_idle_seconds: float, costs: CostsFor, scheduler: Scheduler,
             protect: set[ExpertKey] | None = None) -> list[ExpertKey]:
        slots = _slots(link_idle_seconds, costs, layer)
        if slots <= 0 or not predicted:
            return []
        f = min(predicted)
        keep = _protected({f: predicted[f]}, cache, protect)
        ranked = sorted((e for e in predicted[f] if (f, e) not in cache),
                        key=lambda e: (-cache.policy.score((f, e)), -predicted[f][e], e))
        chosen: list[ExpertKey] = []
        for e in ranked:
            if len(chosen) >= slots:
                break
            if cache.can_insert((f, e), keep | set(chosen)) and ImpactPrefetcher._fits(cache, chosen, (f, e), keep):
                chosen.append((f, e))
        return chosen


PREFETCHERS = {"impact": ImpactPrefetcher, "next-layer-score": NextLayerScorePrefetcher, "none": NoPrefetch}


def get_prefetcher(name: str) -> Prefetcher:
    if name not in PREFETCHERS:
        raise ConfigError(f"unknown prefetcher {name!r}; known: {', '.join(PREFETCHERS)}")
    return PREFETCHERS[name]()
