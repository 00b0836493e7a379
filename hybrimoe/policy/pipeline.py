"""The copy pipeline: every decision about the link, per MoE layer, for the simulator and the runtime.

One `CopyPipeline` per run owns the `LinkQueue` (hybrimoe.policy.link) and drives the cache's slot
accounting (`CacheState`) for copies. An executor (the simulator on its virtual clock, the runtime on
`time.perf_counter()`) calls, per MoE layer whose router output is known at `now`:

    view = pipeline.view(layer, counts, now)             # cached / in flight (arrival) / link free
    plan = pipeline.plan(layer, counts, view, scheduler, costs)   # the scheduler's, priced on the link
    pipeline.demand(layer, plan, now, prefill, current)  # on-demand copies: slot, else transient
    ... run the plan ...
    pipeline.idle(layer, plan, now, predicted, gap, scheduler, current)   # prefetches, then fills
    pipeline.layer_done(layer)                           # staging buffers of the layer are free again

Copies returned by `demand` and `idle` are in link order; the executor performs exactly those (the
runtime on its copy stream, one event each). Rules:
- the plan is the scheduler's, except that its on-demand copies must buy the layer at least what the
  link has recently earned per second prefetching (`link_value`); else the plan without them;
- on-demand copies go first in their layer (they were chosen by the plan, which knew the link's
  state); in prefill one that would evict goes to a transient buffer (evicting for a prompt's stream
  of copies drops experts later layers of the same forward need: measured on dev traces);
- prefetches (the preset's Prefetcher, given the real link state) are issued while a copy would START
  before the next MoE layer starts (estimated: this plan's makespan + the dense gap), so a copy may
  cross the boundary; the impact prefetcher charges each copy for the delay it causes the later
  layers' own copies. A prefetch lands in a cache slot when the cache admits it, else in a staging
  buffer (if one is free); it is protected from eviction until its layer has run;
- fills (`fill_misses`): CPU-computed misses the policy values above their victim, copied into the
  cache only if the copy ENDS before the next MoE layer starts (their gain is not priced in time).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.link import Copy, LinkQueue
from hybrimoe.policy.plan import ExpertCosts, ExpertKey, Plan, build_plan
from hybrimoe.policy.prefetch import NoPrefetch, PrefetchContext, Prefetcher, makespan
from hybrimoe.policy.schedule import Scheduler

CostsFor = Callable[[int], ExpertCosts]
LINK_VALUE_EMA = 0.1  # weight of the newest prefetch gain in `link_value`
_NEVER = 1e30  # a link free time no copy can wait for: plans without on-demand copies


class LayerView(NamedTuple):
    """What the scheduler of one layer is told (seconds from the layer's MoE start)."""

    cached: set[int]  # on the GPU side and landed: cache slots and staging buffers
    arrivals: dict[int, float]  # copies issued earlier (prefetches), still on the link: arrival
    copy_free_at: float  # when the link is free for this layer's own copies


class CopyPipeline:
    def __init__(self, cache: CacheState, costs: CostsFor, moe_layers: list[int], horizon: int = 3,
                 prefetcher: Prefetcher | None = None, fill_misses: bool = False, staging_slots: int = 4,
                 confidence_prior: tuple[float, float] = (1.0, 1.0)) -> None:
        self.cache, self.costs = cache, costs
        self.moe_layers = sorted(moe_layers)
        self._next = {l: self.moe_layers[i + 1: i + 1 + horizon] for i, l in enumerate(self.moe_layers)}
        self.prefetcher: Prefetcher = prefetcher or NoPrefetch()
        self.fill_misses = fill_misses
        self.stage_first = False  # prefetches into a free staging buffer before a cache slot
        self.link = LinkQueue(staging_slots)
        self.pending: set[ExpertKey] = set()  # prefetched into a slot, not yet used by its layer
        self.prefetched_used = 0  # prefetched experts that their layer activated
        # what a second of link time has recently bought when spent on prefetches (seconds saved per
        # link second, EMA over prefetch rounds; 0 while the prefetcher found nothing worth copying)
        self.link_value = 0.0
        self.confidence_prior = confidence_prior  # Beta prior (used, unused) of the prefetch record

    @property
    def confidence(self) -> float:
        """Share of the prefetches so far that their layer used (Beta prior `confidence_prior`, by
        default (1, 1): 0.5 before any)."""
        used, unused = self.confidence_prior
        return (self.prefetched_used + used) / (self.link.copies["prefetch"] + used + unused)

    def future(self, layer: int) -> list[int]:
        """The MoE layers a prefetch after `layer` may serve."""
        return self._next.get(layer, [])

    # -- one layer ---------------------------------------------------------------------------------
    def view(self, layer: int, counts: dict[int, int], now: float) -> LayerView:
        """The layer's activated experts split into landed and in flight, and the link's free time.
        Counts prefetched experts that are used (`prefetched_used`)."""
        cached, arrivals = set(), {}
        resident = self.cache.live_layer(layer)
        staged, pending_arrival = self.link.live_views()
        for e in counts:
            key = (layer, e)
            is_staged = key in staged
            if e in resident or is_staged:
                arrival = pending_arrival.get(key)
                if arrival is not None and arrival > now:
                    arrivals[e] = arrival - now
                else:
                    cached.add(e)
                if is_staged or key in self.pending:
                    self.prefetched_used += 1
        return LayerView(cached, arrivals, max(0.0, self.link.free_at - now))

    def plan(self, layer: int, counts: dict[int, int], view: LayerView, scheduler: Scheduler,
             costs: ExpertCosts) -> Plan:
        """The scheduler's plan, unless its on-demand copies buy this layer less than the link earns
        prefetching: then the plan without on-demand copies (the link stays free for prefetches).
        The scheduler sees one layer; the link is shared by all (an on-demand copy that saves 1.3 ms
        of a Mixtral layer takes the 3.6 ms in which a prefetch would save 2.2-2.9 ms of a later one)."""
        plan = scheduler.plan(layer, counts, view.cached, costs, copy_free_at=view.copy_free_at,
                              arrivals=view.arrivals)
        if not plan.copies or self.link_value <= 0.0:
            return plan
        without = makespan(scheduler, layer, counts, view.cached, costs, _NEVER, view.arrivals)
        if without - plan.makespan >= self.link_value * costs.copy() * len(plan.copies):
            return plan
        no_copy = scheduler.plan(layer, counts, view.cached, costs, copy_free_at=_NEVER, arrivals=view.arrivals)
        return build_plan(layer, counts, no_copy.gpu_order, (), no_copy.cpu_order, costs, view.copy_free_at,
                          arrivals={e: a for e, a in view.arrivals.items() if e in no_copy.gpu_order})

    def demand(self, layer: int, plan: Plan, now: float, prefill: bool, current: set[ExpertKey]) -> list[Copy]:
        """Issue the plan's on-demand copies: into a cache slot, or a transient buffer when the cache
        does not take the expert (in prefill: whenever that would evict)."""
        if not plan.copies:
            return []
        copy = self.costs(layer).copy()
        protect = current | self.pending
        out = []
        for e in plan.copies:
            key = (layer, e)
            slot = self._may_take_slot(key, prefill) and self.cache.insert(key, protect=protect)
            out.append(self.link.issue(key, "demand", "slot" if slot else "transient", now, copy))
        return out

    def idle(self, layer: int, plan: Plan, now: float, predicted: dict[int, dict[int, int]], next_gap: float,
             gap: Callable[[int], float], scheduler: Scheduler, current: set[ExpertKey],
             counts: dict[int, int], prefill: bool = False) -> list[Copy]:
        """Prefetches for the next layers, then fills, issued after the layer's own copies.

        predicted: {later MoE layer: {expert: tokens}} ({} = no prediction); next_gap: seconds from
        this layer's end to the next MoE layer's router output (or to the forward's end); gap(f): the
        same before a later MoE layer f; counts: this layer's {expert: tokens} (fills: most loaded first);
        prefill: a prefetch takes a cache slot only while the layer's budget has a free one (as on-demand
        copies: evicting for a prompt's stream of copies drops experts later layers need), else staging."""
        out: list[Copy] = []
        future = [f for f in self.future(layer) if f in predicted]
        window_end = self.next_layer_start(now, plan, next_gap)
        if future and not isinstance(self.prefetcher, NoPrefetch):
            out += self._prefetch(layer, now, future, predicted, gap, scheduler, current, window_end, prefill)
        if self.fill_misses:
            copy = self.costs(layer).copy()
            protect = current | self.pending
            for e in sorted(plan.cpu_order, key=lambda x: (-counts[x], x)):
                key = (layer, e)
                if self.link.start_of_next(now) + copy > window_end + 1e-12:
                    break
                if key not in self.cache and self.cache.insert(key, protect=protect, by_value=True):
                    out.append(self.link.issue(key, "fill", "slot", now, copy))
        return out

    @staticmethod
    def next_layer_start(now: float, plan: Plan, next_gap: float) -> float:
        """Estimated start of the next MoE layer: this layer's predicted end + the dense gap after it.
        Prefetches must start before it (`idle`); a caller may skip predicting when the link is
        booked past it."""
        return now + plan.makespan + next_gap

    def _prefetch(self, layer: int, now: float, future: list[int], predicted: dict[int, dict[int, int]],
                  gap: Callable[[int], float], scheduler: Scheduler, current: set[ExpertKey],
                  window_end: float, prefill: bool) -> list[Copy]:
        predicted = {f: predicted[f] for f in future}
        arrivals = {f: {e: a for e in predicted[f] if (a := self._arrival((f, e), now)) is not None}
                    for f in future}
        starts, t = {}, window_end
        for i, f in enumerate(future):  # estimated MoE start of each later layer, from its predicted plan
            if i:
                t += gap(f)
            starts[f] = t
            cached = (self.cache.cached_experts(f) & set(predicted[f])) - set(arrivals[f])
            t += makespan(scheduler, f, predicted[f], cached, self.costs(f), max(0.0, self.link.free_at - t),
                          {e: max(0.0, a - starts[f]) for e, a in arrivals[f].items()})
        keep = current | self.pending | {(f, e) for f in future for e in predicted[f] if (f, e) in self.cache}
        copy = self.costs(layer).copy()

        def admissible(key: ExpertKey) -> bool:
            return (self._may_take_slot(key, prefill) and self.cache.can_insert(key, keep)) \
                or self.link.staging_free() > 0

        ctx = PrefetchContext(layer, predicted, self.cache, self.link.start_of_next(now), window_end, starts,
                              arrivals, self.costs, scheduler, admissible, confidence=self.confidence)
        out: list[Copy] = []
        while ctx.link_free < window_end:
            if not self.prefetcher.crosses_layers and ctx.link_free + copy > window_end + 1e-12:
                break
            picked = self.prefetcher.pick(ctx)
            if picked is None:
                if not out:  # the link was free and nothing was worth copying
                    self.link_value *= 1.0 - LINK_VALUE_EMA
                break
            self.link_value += LINK_VALUE_EMA * (picked[1] / copy - self.link_value)
            key = picked[0]
            if self.stage_first and self.link.staging_free() > 0:
                issued = self.link.issue(key, "prefetch", "staging", now, copy)
            elif self._may_take_slot(key, prefill) and self.cache.insert(key, protect=keep):
                issued = self.link.issue(key, "prefetch", "slot", now, copy)
                self.pending.add(key)
            else:
                issued = self.link.issue(key, "prefetch", "staging", now, copy)
            keep.add(key)
            ctx.taken.add(key)
            ctx.arrivals.setdefault(key[0], {})[key[1]] = issued.end
            ctx.link_free = self.link.start_of_next(now)
            out.append(issued)
        return out

    def _may_take_slot(self, key: ExpertKey, prefill: bool) -> bool:
        """In prefill a copy takes a cache slot only while its layer's budget has a free one: evicting
        for a prompt's stream of copies drops experts that later layers of the forward need."""
        return not prefill or self.cache.has_room(key[0])

    def _arrival(self, key: ExpertKey, now: float) -> float | None:
        """Arrival of a copy of `key` issued earlier and not landed by `now`; None when none pends."""
        arrival = self.link.arrival(key)
        return arrival if arrival is not None and arrival > now and (key in self.cache or self.link.staged(key)) \
            else None

    def layer_done(self, layer: int) -> list[ExpertKey]:
        """The layer has run: its staged experts leave their buffers (returned) and its prefetched
        experts are no longer protected."""
        self.pending = {k for k in self.pending if k[0] != layer}
        return self.link.layer_done(layer)
