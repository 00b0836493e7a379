"""Trace-driven simulation of one policy on a virtual clock.

Per forward (the prompt in one prefill forward, then one forward per decode step: one token at batch
1, one token of each of B sequences at batch B, `Workload.decode_steps`), per layer:
1. dense GPU work (attention, router, shared experts; `SimCosts.dense`); the router's output is
   known at its end, so the MoE part starts there;
2. MoE layers: the cache policy observes every token's router scores; the copy pipeline
   (hybrimoe.policy.pipeline, the object the runtime drives too) says which activated experts have
   landed on the GPU side, which are still in flight (and when they land), and when the link is free;
   each activated expert is a cache hit or miss; the preset's scheduler plans the layer with that
   knowledge; the pipeline issues the plan's on-demand copies (decode: into the cache; prefill: only
   into free slots, else a transient buffer, because evicting for the prompt's stream of copies drops
   experts that later layers of the same forward need: measured on dev traces), the plan runs on the
   three timelines;
3. the pipeline then issues prefetches for the next `horizon` MoE layers (the preset's prefetcher,
   priced on the real link state; they may still be on the link when the next layer starts) and,
   with `fill_misses`, copies CPU-computed misses into the cache if they end before the next layer.
The link is one FIFO queue across layers; its busy time is charged from the copies it carried.
Planning takes no simulated time (the runtime's cost of it: benchmarks/bench_planning.py).
The forward ends with the LM head. TTFT = prefill forward; TBT = mean decode forward.
A forward of fewer than `preset.prefill_min_tokens` tokens is planned by the decode scheduler
(llama.cpp: 32); a decode step of B tokens by the decode scheduler too, unless the preset places
by tokens per op (`Preset.scheduler_role`: llama.cpp's op offload at B >= 32); decode forwards of a
`preset.cuda_graphs` preset are priced by `costs.with_cuda_graphs()` (graph-captured launch
overheads), everything else by `costs`.
Batch B (continuous batching): a decode step's B tokens are routed together, so each MoE layer
plans the UNION of their experts with per-expert token counts (an expert two sequences chose runs
once over 2 tokens, as in a prompt); the cache policy observes each token's scores in lane order
(MRS's decay is per token: B updates per step); a hit or miss is counted once per activated expert
of the step; the pipeline's prefill rule (no eviction for a prompt's copies) is for prompts only; the
dense part reads the weights once and each sequence's KV (`SimCosts.dense_decode`, every lane at
context = prompt length + steps so far, as at batch 1); the LM head computes B rows of logits.
TBT = mean decode step (the time between two tokens of each sequence); tokens/s = B / TBT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cache_policy import activation_frequency, make_policy
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.pipeline import CopyPipeline, LayerView
from hybrimoe.policy.plan import ExpertKey, Plan
from hybrimoe.policy.predictor import NoPredictor, Predictor, TruthWithNoise
from hybrimoe.policy.prefetch import get_prefetcher
from hybrimoe.policy.presets import Preset, initial_content
from hybrimoe.policy.shape import ModelShape
from hybrimoe.policy.schedule import Scheduler, get_scheduler
from hybrimoe.sim.costs import SimCosts
from hybrimoe.sim.metrics import ForwardLog, LayerLog, SimResult, Span
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
    staging_slots: int = 4  # device buffers for prefetched experts the cache does not keep
    mrs_alpha: float = 0.5
    per_layer_cache: bool = False  # per-layer slot budgets instead of one global budget
    seed: int = 0
    timeline_step: int | None = None  # forward index whose spans are recorded (0 = prefill if any)


@dataclass
class _Run:
    """Mutable state of one simulation."""

    cache: CacheState
    clock: float = 0.0
    busy: dict[str, float] = field(default_factory=lambda: {"cpu": 0.0, "gpu": 0.0, "copy": 0.0})
    pipeline: CopyPipeline | None = None  # the link queue and every copy decision
    spans: list[Span] = field(default_factory=list)
    forwards: list[ForwardLog] = field(default_factory=list)  # per forward: counts and residency per layer
    held_at_start: set = field(default_factory=set)  # experts on the GPU side when the forward began


def bound_residents(layer: int, view: LayerView, held_at_start: set[ExpertKey]) -> frozenset[int]:
    """The layer's experts the bound counts as resident: landed by the access, or in flight since before
    this forward began (part of that copy fell in an earlier forward: counting it free is the safe side).
    An expert whose copy was issued within this forward and is still in flight is a miss to the bound:
    its copy, if the plan waits for it, happens within this forward and is charged as any copy."""
    return frozenset(view.cached) | frozenset(e for e in view.arrivals if (layer, e) in held_at_start)


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
        cache = self._new_cache(trace)
        pipeline = CopyPipeline(cache, self.costs.experts, self.moe_layers, self.config.horizon, self.prefetcher,
                                self.preset.fill_misses, self.config.staging_slots)
        pipeline.link.log = []
        run = _Run(cache=cache, pipeline=pipeline)
        decode_steps = workload.decode_steps or [[t] for t in workload.decode]
        steps = ([workload.prefill] if workload.prefill else []) + decode_steps
        prefill_time = None
        decode_times: list[float] = []
        hm = {"prefill": [0, 0], "decode": [0, 0]}
        for index, tokens in enumerate(steps):
            phase = "prefill" if (workload.prefill and index == 0) else "decode"
            h0, m0 = run.cache.hits, run.cache.misses
            record = index == self.config.timeline_step
            # KV context of every sequence of the forward: the prompt's 0; each decode lane's, the
            # prompt length + the steps before this one (index counts the prefill forward)
            context = 0 if phase == "prefill" else len(workload.prefill) + index - (1 if workload.prefill else 0)
            seconds = self._forward(run, tokens, context, phase, record)
            hm[phase][0] += run.cache.hits - h0
            hm[phase][1] += run.cache.misses - m0
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
            batch=workload.batch,
            decode_tokens_per_second=workload.batch * len(decode_times) / sum(decode_times) if decode_times else None,
            hit_rate=run.cache.hit_rate, prefill_hit_rate=rate(*hm["prefill"]), decode_hit_rate=rate(*hm["decode"]),
            bytes_copied=sum(run.pipeline.link.copies.values()) * int(self.costs.expert_bytes),
            prefetch_copies=run.pipeline.link.copies["prefetch"], prefetch_useful=run.pipeline.prefetched_used, cpu_busy=run.busy["cpu"] / total,
            gpu_busy=run.busy["gpu"] / total, link_busy=run.busy["copy"] / total,
            predictor=self.predictor.name, total_seconds=run.clock,
            trace=trace.header.source or trace.header.model, model=getattr(self.shape, "name", ""),
            notes=list(workload.notes))
        self.spans = run.spans
        self.forwards = run.forwards
        self.link_log = run.pipeline.link.log  # every copy in link order (key, kind, destination, times)
        return result

    def _forward(self, run: _Run, tokens: list[TokenRouting], context: int, phase: str, record: bool) -> float:
        """Simulate one forward (a prompt, or a decode step of len(tokens) sequences at `context` each);
        returns its seconds and advances `run.clock`."""
        start = run.clock
        n = len(tokens)
        self.costs = self._decode_costs if phase == "decode" else self._eager_costs  # costs hook (above)
        role = self.preset.scheduler_role(n, phase == "prefill")
        scheduler = self.prefill_scheduler if role == "prefill" else self.decode_scheduler
        if phase == "prefill":
            dense = [self.costs.dense(layer, n, context) for layer in range(self.shape.num_layers)]
            logits = 1  # only the prompt's last position
        else:
            dense = [self.costs.dense_decode(layer, (context,) * n) for layer in range(self.shape.num_layers)]
            logits = n
        self._dense_gap = self._gaps(dense)
        self._prompt = phase == "prefill" and n > 1  # the pipeline's prefill rule (a 1-token prompt: decode's)
        head = self.costs.lm_head(logits)
        log_ = ForwardLog(phase, n, context, sum(dense) + head, 0.0)
        run.forwards.append(log_)
        run.held_at_start = run.cache.resident() | run.pipeline.link.staged_keys()
        t = start
        for layer in range(self.shape.num_layers):
            if record:
                run.spans.append(Span("gpu", layer, -1, t - start, t + dense[layer] - start, "dense"))
            run.busy["gpu"] += dense[layer]
            t += dense[layer]
            if layer not in self.moe_layers:
                continue
            tail = sum(dense[layer + 1:]) + head  # after the last MoE layer: to the forward's end
            t = self._moe_layer(run, tokens, layer, t, start, tail, scheduler, record)
        if record:
            run.spans.append(Span("gpu", self.shape.num_layers, -1, t - start, t + head - start, "dense"))
        run.busy["gpu"] += head
        run.clock = t + head
        log_.seconds = run.clock - start
        return run.clock - start

    def phase_costs(self, phase: str) -> SimCosts:
        """The costs this preset's forwards of `phase` ran with (kTransformers' decode: CUDA graphs)."""
        return self._decode_costs if phase == "decode" else self._eager_costs

    def _gaps(self, dense: list[float]) -> dict[int, float]:
        """{MoE layer: dense seconds since the previous MoE layer ended} (the first: since the forward began)."""
        gaps, acc = {}, 0.0
        for layer, seconds in enumerate(dense):
            acc += seconds
            if layer in self.moe_layers:
                gaps[layer], acc = acc, 0.0
        return gaps

    def _moe_layer(self, run: _Run, tokens: list[TokenRouting], layer: int, t: float, step_start: float,
                   tail: float, scheduler: Scheduler, record: bool) -> float:
        cache, policy, pipeline = run.cache, run.cache.policy, run.pipeline
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
        view = pipeline.view(layer, counts, t)
        run.forwards[-1].layers.append(LayerLog(layer, dict(counts), bound_residents(layer, view, run.held_at_start)))
        # landed by now but not held when the forward began: copied (prefetch or fill) within this forward
        run.forwards[-1].entered += [layer for e in view.cached if (layer, e) not in run.held_at_start]
        for e in counts:
            cache.access((layer, e))
        plan: Plan = pipeline.plan(layer, counts, view, scheduler, self.costs.experts(layer))
        current = {(layer, e) for e in counts}
        cache.pin(current)
        copies = pipeline.demand(layer, plan, t, self._prompt, current)
        for task in plan.tasks:
            if task.resource == "copy":
                continue  # charged from the link's own record below
            run.busy[task.resource] += task.end - task.start
            if record:
                run.spans.append(Span(task.resource, layer, task.expert, t + task.start - step_start,
                                      t + task.end - step_start, "expert"))
        end = t + plan.makespan
        predicted: dict[int, dict[int, int]] = {}
        future = pipeline.future(layer)
        if future and self.preset.prefetch != "none":
            predicted = self.predictor.predict(tokens, layer, future)
        next_gap = self._gap(future[0]) if future else tail
        copies += pipeline.idle(layer, plan, t, predicted, next_gap, self._gap, scheduler, current, counts,
                                prefill=self._prompt)
        for c in copies:
            run.busy["copy"] += c.end - c.start
            if record:
                kind = {"demand": "copy", "prefetch": "prefetch", "fill": "fill"}[c.kind]
                run.spans.append(Span("copy", c.key[0], c.key[1], c.start - step_start, c.end - step_start, kind))
        cache.unpin_all()
        pipeline.layer_done(layer)
        return end

    def _gap(self, layer: int) -> float:
        """Dense seconds from the previous MoE layer's end to `layer`'s router output (this forward)."""
        return self._dense_gap[layer]
