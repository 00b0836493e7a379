"""Inter-layer prefetchers: which expert of a later layer the link should copy next.

`Prefetcher.pick(ctx) -> (key, gain) | None` is asked by the copy pipeline (hybrimoe.policy.pipeline)
once per copy it could issue after a MoE layer's plan is fixed; `ctx` (`PrefetchContext`) carries the
predicted per-expert token counts of the next layers, the cache, the REAL link state (when the link
is free, which experts of those layers are already in flight and when they land), the estimated start
of each later layer's MoE part, the costs and the scheduler that will plan those layers. The pipeline
issues the pick (into a cache slot, else a staging buffer), updates the link state and asks again,
while a copy would still start before the next MoE layer starts (a copy may cross the boundary).

Registry: `get_prefetcher(name)`; an unknown name raises ConfigError listing the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.plan import ExpertCosts, ExpertKey
from hybrimoe.policy.schedule import Scheduler

CostsFor = Callable[[int], ExpertCosts]


@dataclass
class PrefetchContext:
    """What a prefetcher sees (absolute seconds on the caller's clock)."""

    layer: int  # the MoE layer whose plan was just fixed
    predicted: dict[int, dict[int, int]]  # {later MoE layer: {expert: predicted tokens}}
    cache: CacheState
    link_free: float  # when a copy issued now would start
    window_end: float  # estimated start of the next MoE layer: copies must start before it
    starts: dict[int, float]  # estimated start of each predicted layer's MoE part
    arrivals: dict[int, dict[int, float]]  # {later layer: {expert: arrival}} for copies already issued
    # (cache slots or staging buffers, picks of this round included: the pipeline adds each pick)
    costs: CostsFor
    scheduler: Scheduler
    admissible: Callable[[ExpertKey], bool]  # whether the pick could land (slot or staging buffer)
    taken: set[ExpertKey] = field(default_factory=set)  # picked so far (in flight now)
    confidence: float = 1.0  # chance that a predicted expert is used (the pipeline's running record)
    memo: dict = field(default_factory=dict)  # prefetcher's scratch: plans already priced this round


class Prefetcher(Protocol):
    name: str
    crosses_layers: bool  # may its copies still be on the link when the next layer starts?

    def pick(self, ctx: PrefetchContext) -> tuple[ExpertKey, float] | None: ...


class NoPrefetch:
    name = "none"
    crosses_layers = False

    def pick(self, ctx: PrefetchContext) -> tuple[ExpertKey, float] | None:
        return None


def _candidates(ctx: PrefetchContext, f: int) -> list[int]:
    """Predicted experts of layer f with nothing on the GPU side yet, most loaded first."""
    counts = ctx.predicted[f]
    return sorted((e for e in counts if (f, e) not in ctx.cache and e not in ctx.arrivals.get(f, {})
                   and (f, e) not in ctx.taken), key=lambda e: (-counts[e], e))


class ImpactPrefetcher:
    """Impact-driven prefetching (PAPER.md (ii)), priced on the real link.

    A copy issued now starts at `link_free` and lands at a = link_free + copy. For a candidate (f, e)
    its gain is the drop in the predicted makespans of the later layers g (each planned by the
    scheduler on its predicted counts, its cached experts, the experts already in flight with their
    arrivals, and the link busy until max(0, link_free - start_g)) when e is added to f's arrivals at a
    and the link is busy one copy longer: sum over g of makespan_g(before) - makespan_g(after). The
    second term is what the copy costs the on-demand copies of the layers it delays; so a prefetch that
    lands after its layer would have finished anyway, or that pushes the next layer's own copies back
    by more than it saves, has no positive gain. The best admissible candidate with a positive gain
    is picked; the pipeline asks again with the pick in flight (gains that overlap are not counted
    twice). The saving is weighted by `ctx.confidence`, the share of earlier prefetches that their
    layer used (a poor predictor's copies mostly delay and evict); the delay they cause is certain.
    Only the `max_candidates` most loaded candidates per layer are evaluated, and of those with
    the same predicted load only one (they are interchangeable: same costs, none on the GPU side);
    plans are memoised within a round (one layer's prefetch decisions).
    """

    name = "impact"
    crosses_layers = True

    def __init__(self, max_candidates: int = 8) -> None:
        self.max_candidates = max_candidates

    def pick(self, ctx: PrefetchContext) -> tuple[ExpertKey, float] | None:
        copy = ctx.costs(ctx.layer).copy()
        if copy <= 0 or ctx.link_free >= ctx.window_end or not ctx.predicted:
            return None
        land = ctx.link_free + copy
        before = {f: self._makespan(ctx, f, ctx.link_free) for f in ctx.predicted}
        delayed = {f: self._makespan(ctx, f, land) for f in ctx.predicted}  # the link one copy busier
        delay_cost = sum(delayed[f] - before[f] for f in ctx.predicted)
        ranked: list[tuple[float, int, int]] = []
        for f in ctx.predicted:
            others = delay_cost - (delayed[f] - before[f])
            seen: dict[int, float] = {}  # token count -> gain: candidates of equal load are interchangeable
            for e in _candidates(ctx, f)[: self.max_candidates]:
                n = ctx.predicted[f][e]
                if n not in seen:  # expected gain: the saving if the prediction holds, the delay surely
                    seen[n] = ctx.confidence * (before[f] - self._makespan(ctx, f, land, (e, land))) \
                        - (1.0 - ctx.confidence) * (delayed[f] - before[f]) - others
                if seen[n] > 1e-12:
                    ranked.append((-seen[n], f, e))
        for neg_gain, f, e in sorted(ranked):  # best gain first; ties: earlier layer, lower id
            if ctx.admissible((f, e)):
                return (f, e), -neg_gain
        return None

    @staticmethod
    def _makespan(ctx: PrefetchContext, f: int, link_free: float, extra: tuple[int, float] | None = None) -> float:
        """Predicted makespan of later layer f with the link free at `link_free` (absolute) and, if
        given, one more expert `extra` = (expert, absolute arrival) in flight (memoised per round)."""
        counts = ctx.predicted[f]
        if not counts:
            return 0.0
        start = ctx.starts[f]
        arrivals = {e: max(0.0, a - start) for e, a in ctx.arrivals.get(f, {}).items() if e in counts}
        if extra is not None:
            arrivals[extra[0]] = max(0.0, extra[1] - start)
        cached = {e for e in ctx.cache.cached_experts(f) if e in counts} - set(arrivals)
        cached |= {e for e, a in arrivals.items() if a <= 0.0}  # landed before the layer starts
        arrivals = {e: a for e, a in arrivals.items() if a > 0.0}
        copy_free_at = max(0.0, link_free - start)
        key = (f, frozenset(cached), frozenset(arrivals.items()), copy_free_at)
        if key not in ctx.memo:
            ctx.memo[key] = makespan(ctx.scheduler, f, counts, cached, ctx.costs(f), copy_free_at, arrivals)
        return ctx.memo[key]


def makespan(scheduler: Scheduler, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float, arrivals: dict[int, float]) -> float:
    """The scheduler's predicted makespan (its fast `makespan` when it has one, else its plan's)."""
    fast = getattr(scheduler, "makespan", None)
    if fast is not None:
        return fast(layer, counts, cached, costs, copy_free_at=copy_free_at, arrivals=arrivals)
    return scheduler.plan(layer, counts, cached, costs, copy_free_at=copy_free_at, arrivals=arrivals).makespan


class NextLayerScorePrefetcher:
    """What the public HybriMoE code does: prefetch the next layer's predicted experts with the
    highest cache score (the policy's `score`, e.g. MRS priority; ties by predicted count), only while
    the copy ends before the next layer starts (its copies never cross a layer boundary)."""

    name = "next-layer-score"
    crosses_layers = False

    def pick(self, ctx: PrefetchContext) -> tuple[ExpertKey, float] | None:
        if not ctx.predicted:
            return None
        f = min(ctx.predicted)
        score = ctx.cache.policy.score
        for e in sorted(_candidates(ctx, f), key=lambda e: (-score((f, e)), -ctx.predicted[f][e], e)):
            if ctx.admissible((f, e)):
                return (f, e), score((f, e))
        return None


PREFETCHERS = {"impact": ImpactPrefetcher, "next-layer-score": NextLayerScorePrefetcher, "none": NoPrefetch}


def get_prefetcher(name: str) -> Prefetcher:
    if name not in PREFETCHERS:
        raise ConfigError(f"unknown prefetcher {name!r}; known: {', '.join(PREFETCHERS)}")
    return PREFETCHERS[name]()
