"""Trace-driven simulation of one policy on a virtual clock (batch 1).

Per forward (the prompt in one prefill forward, then one forward per decoded token), per layer:
1. dense GPU work (attention, router, shared experts; `SimCosts.dense`); the router's output is
   known at its end, so the MoE part starts there;
2. MoE layers: the cache policy observes every token's router scores; each activated expert is a
   hit or a miss; the preset's scheduler plans the layer (the link may still be busy with earlier
   prefetches: `copy_free_at`); the plan runs on the three timelines; in decode, copied experts
   are offered to the cache (a static cache keeps them in a transient buffer instead); in prefill
   an on-demand copy enters the cache only while it has free slots, else it goes through a
   transient buffer, for all presets, because evicting for the prompt's stream of copies drops
   experts that later layers of the same forward need (measured on dev traces: hit rate of the
   prefill fell to ~1%); the runtime's executor does the same;
3. the link's idle time from the end of this layer's on-demand copies to the start of the next
   MoE layer's copies is used for prefetches (predicted experts of the next `horizon` MoE layers),
   then, with `fill_misses`, to copy CPU-computed misses into the cache. Only copies that fit in
   that window are issued, so they never delay an on-demand copy.
The forward ends with the LM head. TTFT = prefill forward; TBT = mean decode forward.
A forward of fewer than `preset.prefill_min_tokens` tokens is planned by the decode scheduler
(llama.cpp: 32); decode forwards of a `preset.cuda_graphs` preset are priced by
`costs.with_cuda_graphs()` (graph-captured launch overheads), everything else by `costs`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cache_policy import activation_frequency, make_policy
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.plan import ExpertKey, Plan
from hybrimoe.policy.predictor import NoPredictor, Predictor, TruthWithNoise
from hybrimoe.policy.prefetch import get_prefetcher
from hybrimoe.policy.presets import Preset, initial_content
from hybrimoe.policy.shape import ModelShape
from hybrimoe.policy.schedule import Scheduler, get_scheduler
from hybrimoe.sim.costs import SimCosts
from hybrimoe.sim.metrics import SimResult, Span
from hybrimoe.sim.prompt import Workload
from hybrimoe.trace.format import RoutingTrace, TokenRouting

log = logging.getLogger(__name__)


@dataclass
class SimConfig:
    preset: Preset
    cache_ratio: float  # fraction of all routed experts that fit in the GPU cache
    predictor_accuracy: float = 0.8  # TruthWithNoise accuracy for prefetching presets
    predictor: Predictor | None = None  # overrides predictor_accuracy (e.g. CrossLayerStats)
    horizon: int = 3  # MoE layers looked ahead by the prefetcher (L)
    mrs_alpha: float = 0.5
    per_layer_cache: bool = False  # per-layer slot budgets instead of one global budget
    seed: int = 0
    timeline_step: int | None = None  # forward index whose spans are recorded (0 = prefill if any)


@dataclass
class _Run:
    """Mutable state of one simulation."""

    cache: CacheState
    link_free: float = 0.0  # absolute seconds at which the link is free
    clock: float = 0.0
    busy: dict[str, float] = field(default_factory=lambda: {"cpu": 0.0, "gpu": 0.0, "copy": 0.0})
    copies: int = 0
    prefetch_copies: int = 0
    prefetched: set[ExpertKey] = field(default_factory=set)  # prefetched, not yet used
    prefetch_useful: int = 0
    spans: list[Span] = field(default_factory=list)


class Simulator:
    def __init__(self, shape: ModelShape, costs: SimCosts, config: SimConfig,
                 warmup: list[RoutingTrace] | None = None) -> None:
        """`shape`: a ModelShape (num_layers, moe_layers, num_experts, top_k); `warmup`: traces whose
        activation frequencies pick the initial hot set (dev traces of the same model)."""
        if not 0.0 <= config.cache_ratio <= 1.0:
            raise ConfigError(f"cache ratio must be in [0, 1], got {config.cache_ratio}")
        if config.horizon < 0:
            raise ConfigError(f"prefetch look-ahead must be >= 0 MoE layers, got {config.horizon}")
        self.shape, self.costs, self.config, self.preset = shape, costs, config, config.preset
        self.moe_layers = sorted(shape.moe_layers)
        self.warmup = warmup or []
        # costs hook: decode forwards of a preset that replays CUDA graphs pay graph-captured launch
        # overheads (`SimCosts.with_cuda_graphs`); everything else pays eager ones
        self._eager_costs = costs
        self._decode_costs = costs.with_cuda_graphs() if self.preset.cuda_graphs else costs
        self.prefill_scheduler = get_scheduler(self.preset.prefill)
        self.decode_scheduler = get_scheduler(self.preset.decode)
        self.prefetcher = get_prefetcher(self.preset.prefetch)
        if self.preset.prefetch == "none":
            self.predictor: Predictor = NoPredictor()
        elif self.preset.oracle:
            self.predictor = TruthWithNoise(1.0, shape.num_experts, config.seed)
        else:
            self.predictor = config.predictor or TruthWithNoise(config.predictor_accuracy, shape.num_experts,
                                                                config.seed)

    # -- set-up --------------------------------------------------------------------------------
    def _new_cache(self, trace: RoutingTrace) -> CacheState:
        total = self.shape.num_experts * len(self.moe_layers)
        slots = total if self.preset.initial == "all" else int(round(self.config.cache_ratio * total))
        per_layer = None
        if self.config.per_layer_cache:
            per_layer = {l: slots // len(self.moe_layers) for l in self.moe_layers}
        sources = self.warmup or [trace]
        freq = activation_frequency((l, r.experts) for t in sources for tok in t.tokens
                                    for l, r in tok.layers.items())
        hot, capacity, per_layer = initial_content(self.preset, self.moe_layers, self.shape.num_experts, slots,
                                                   freq, per_layer)
        policy = make_policy(self.preset.cache, top_k=self.shape.top_k, alpha=self.config.mrs_alpha,
                             hot=hot, frequency=freq)
        cache = CacheState(capacity, policy, int(self.costs.expert_bytes), per_layer)
        cache.preload(hot)
        return cache

    # -- run -----------------------------------------------------------------------------------
    def run(self, trace: RoutingTrace, workload: Workload) -> SimResult:
        bad = sorted(set(trace.header.moe_layers) - set(self.moe_layers))
        if bad or trace.header.num_experts != self.shape.num_experts:
            raise ConfigError(f"trace of {trace.header.model} ({trace.header.num_experts} experts, MoE layers "
                              f"{trace.header.moe_layers[:3]}...) does not fit model shape {self.shape.name} "
                              f"({self.shape.num_experts} experts)")
        run = _Run(cache=self._new_cache(trace))
        steps = ([workload.prefill] if workload.prefill else []) + [[t] for t in workload.decode]
        prefill_time = None
        decode_times: list[float] = []
        hm = {"prefill": [0, 0], "decode": [0, 0]}
        context = 0
        for index, tokens in enumerate(steps):
            phase = "prefill" if (workload.prefill and index == 0) else "decode"
            h0, m0 = run.cache.hits, run.cache.misses
            record = index == self.config.timeline_step
            seconds = self._forward(run, tokens, context, phase, record)
            hm[phase][0] += run.cache.hits - h0
            hm[phase][1] += run.cache.misses - m0
            context += len(tokens)
            if phase == "prefill":
                prefill_time = seconds
            else:
                decode_times.append(seconds)
        total = max(run.clock, 1e-30)
        rate = lambda h, m: h / (h + m) if h + m else None  # noqa: E731
        return self._result(
            run, workload, trace, prefill_time, decode_times, hm, total, rate)

    def _result(self, run, workload, trace, prefill_time, decode_times, hm, total, rate) -> SimResult:
        result = SimResult(
            policy=self.preset.name, cache_ratio=self.config.cache_ratio, cache_slots=run.cache.capacity,
            prompt_tokens=len(workload.prefill), decode_steps=len(decode_times), ttft_seconds=prefill_time,
            tbt_seconds=sum(decode_times) / len(decode_times) if decode_times else None,
            hit_rate=run.cache.hit_rate, prefill_hit_rate=rate(*hm["prefill"]), decode_hit_rate=rate(*hm["decode"]),
            bytes_copied=run.copies * int(self.costs.expert_bytes), prefetch_copies=run.prefetch_copies,
            prefetch_useful=run.prefetch_useful, cpu_busy=run.busy["cpu"] / total,
            gpu_busy=run.busy["gpu"] / total, link_busy=run.busy["copy"] / total,
            predictor=self.predictor.name, total_seconds=run.clock,
            trace=trace.header.source or trace.header.model, model=getattr(self.shape, "name", ""),
            notes=list(workload.notes))
        self.spans = run.spans
        return result

    def _forward(self, run: _Run, tokens: list[TokenRouting], context: int, phase: str, record: bool) -> float:
        """Simulate one forward; returns its seconds and advances `run.clock`."""
        start = run.clock
        n = len(tokens)
        self.costs = self._decode_costs if phase == "decode" else self._eager_costs  # costs hook (above)
        scheduler = self.prefill_scheduler if self.preset.uses_prefill_scheduler(n) else self.decode_scheduler
        dense = [self.costs.dense(layer, n, context) for layer in range(self.shape.num_layers)]
        t = start
        for layer in range(self.shape.num_layers):
            if record:
                run.spans.append(Span("gpu", layer, -1, t - start, t + dense[layer] - start, "dense"))
            run.busy["gpu"] += dense[layer]
            t += dense[layer]
            if layer not in self.moe_layers:
                continue
            next_dense = dense[layer + 1] if layer + 1 < len(dense) else self.costs.lm_head(n)
            t = self._moe_layer(run, tokens, layer, t, start, next_dense, scheduler, record)
        head = self.costs.lm_head(n)
        if record:
            run.spans.append(Span("gpu", self.shape.num_layers, -1, t - start, t + head - start, "dense"))
        run.busy["gpu"] += head
        run.clock = t + head
        return run.clock - start

    def _moe_layer(self, run: _Run, tokens: list[TokenRouting], layer: int, t: float, step_start: float,
                   next_dense: float, scheduler: Scheduler, record: bool) -> float:
        cache, policy = run.cache, run.cache.policy
        counts: dict[int, int] = {}
        for token in tokens:
            routing = token.layers.get(layer)
            if routing is None:
                continue
            policy.observe(layer, routing.scores, routing.experts, routing.weights)
            for e in routing.experts:
                counts[e] = counts.get(e, 0) + 1
        if not counts:
            return t
        for e in counts:
            key = (layer, e)
            if cache.access(key) and key in run.prefetched:
                run.prefetch_useful += 1
            run.prefetched.discard(key)
        cached = cache.cached_experts(layer) & set(counts)
        costs = self.costs.experts(layer)
        plan: Plan = scheduler.plan(layer, counts, cached, costs, copy_free_at=max(0.0, run.link_free - t))
        current = {(layer, e) for e in counts}
        cache.pin(current)
        for e in plan.copies:
            # prefill copies that would evict stream through a transient buffer (no cache churn within
            # the prompt's forward); free slots are filled, as the runtime does
            if len(tokens) == 1 or cache.has_room(layer):
                cache.insert((layer, e), protect=current)
        run.copies += len(plan.copies)
        for task in plan.tasks:
            run.busy[task.resource] += task.end - task.start
            if record:
                run.spans.append(Span(task.resource, layer, task.expert, t + task.start - step_start,
                                      t + task.end - step_start, "copy" if task.resource == "copy" else "expert"))
        end = t + plan.makespan
        link = max(run.link_free, t + plan.copy_finish)
        window_end = end + next_dense  # the next MoE layer's copies cannot start before this
        link = self._idle_copies(run, tokens, layer, plan, counts, link, window_end, current, scheduler,
                                 step_start, record)
        run.link_free = link
        cache.unpin_all()
        return end

    def _idle_copies(self, run: _Run, tokens: list[TokenRouting], layer: int, plan: Plan, counts: dict[int, int],
                     link: float, window_end: float, current: set[ExpertKey], scheduler: Scheduler,
                     step_start: float, record: bool) -> float:
        """Prefetch, then fill, in the link's idle window [link, window_end); returns link free time."""
        cache = run.cache
        copy = self.costs.experts(layer).copy()
        i = self.moe_layers.index(layer)
        future = self.moe_layers[i + 1: i + 1 + self.config.horizon]
        protect = set(current)
        if future and self.preset.prefetch != "none" and window_end - link >= copy:
            predicted = self.predictor.predict(tokens, layer, future)
            keys = self.prefetcher.step(layer, predicted, cache, window_end - link, self.costs.experts,
                                        scheduler, protect)
            protect |= {(f, e) for f, c in predicted.items() for e in c if (f, e) in cache}
            for key in keys:
                if link + copy > window_end + 1e-12 or not cache.insert(key, protect=protect):
                    continue
                protect.add(key)
                run.prefetched.add(key)
                link = self._copy(run, key, link, copy, step_start, record, "prefetch")
                run.prefetch_copies += 1
        if self.preset.fill_misses:
            for e in sorted(plan.cpu_order, key=lambda x: (-counts[x], x)):
                key = (layer, e)
                if link + copy > window_end + 1e-12:
                    break
                if key not in cache and cache.insert(key, protect=protect, by_value=True):
                    link = self._copy(run, key, link, copy, step_start, record, "fill")
        return link

    @staticmethod
    def _copy(run: _Run, key: ExpertKey, link: float, copy: float, step_start: float, record: bool,
              kind: str) -> float:
        run.busy["copy"] += copy
        run.copies += 1
        if record:
            run.spans.append(Span("copy", key[0], key[1], link - step_start, link + copy - step_start, kind))
        return link + copy
