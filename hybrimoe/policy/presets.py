"""Named policies: a scheduler for prefill, one for decode, a cache policy, a prefetcher, and how
the cache starts. The simulator and the runtime both take a `Preset` by name.

Every preset but llamacpp and resident starts with the same cache content: the most frequently
activated experts of a warm-up trace (dev traces of the model when available), filling the budget.
Then: "static" caches never change (copied experts run from a transient buffer); dynamic caches
admit copied experts (victim by their policy) and, with `fill_misses`, also copy experts that the
CPU computed on a miss into the cache in link idle time, if the policy values them above the victim.

How an executor (the simulator, or the GPU runtime) drives one MoE layer with a preset, through the
copy pipeline (hybrimoe.policy.pipeline) built from it:
    counts = {expert: tokens}; cache.policy.observe(layer, scores, experts, weights) per token
    view = pipeline.view(layer, counts, now)                       # landed / in flight / link free
    for e in counts: cache.access((layer, e))                      # hit / miss counters
    plan = scheduler.plan(layer, counts, view.cached, costs, view.copy_free_at, arrivals=view.arrivals)
    cache.pin(current keys); pipeline.demand(layer, plan, now, prefill, current) -> on-demand copies
    run the plan on the three timelines
    pipeline.idle(layer, plan, now, predicted, gaps, scheduler, current, counts) -> prefetches (the
    preset's prefetcher, on the real link state), then fills (fill_misses: CPU-computed misses the
    policy values above their victim)
    cache.unpin_all(); pipeline.layer_done(layer)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hybrimoe.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    prefill: str  # scheduler name for prefill forwards (> 1 token)
    decode: str  # scheduler name for decode forwards (1 token)
    cache: str  # cache policy name: mrs | lru | lfu | static
    prefetch: str  # impact | next-layer-score | none
    initial: str = "hot"  # hot (frequency hot set) | layers (first whole layers) | all (everything)
    fill_misses: bool = False  # copy CPU-computed misses into the cache in link idle time
    oracle: bool = False  # predictions are the true future routing, whatever accuracy is asked
    description: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("hybrimoe", "hybrid", "hybrid", "mrs", "impact", fill_misses=True,
           description="HybriMoE: hybrid scheduling + MRS cache + impact-driven prefetch"),
    Preset("hybrimoe-sched-only", "hybrid", "hybrid", "static", "none",
           description="ablation: hybrid scheduling on the kTransformers static cache"),
    Preset("hybrimoe-prefetch-only", "gpu-only", "cpu-on-miss", "lru", "impact",
           description="ablation: kTransformers scheduling + impact prefetch (prefetched slots LRU)"),
    Preset("hybrimoe-cache-only", "gpu-only", "cpu-on-miss", "mrs", "none", fill_misses=True,
           description="ablation: kTransformers scheduling + MRS cache filled from misses"),
    Preset("ktransformers", "gpu-only", "cpu-on-miss", "static", "none",
           description="static hot set; decode misses on CPU; prefill copies misses, CPU idle"),
    Preset("llamacpp", "static-layer", "static-layer", "static", "none", initial="layers",
           description="first N whole layers on the GPU, the rest on the CPU"),
    Preset("gpu-lru", "gpu-only", "gpu-only", "lru", "none",
           description="every miss copied to the GPU, LRU cache (AdapMoE-like without prefetch)"),
    Preset("fiddler", "fiddler-prefill", "cpu-on-miss", "static", "none",
           description="static hot set; per-miss CPU vs copy+GPU choice by cost estimate"),
    Preset("resident", "gpu-only", "gpu-only", "static", "none", initial="all",
           description="every expert on the GPU (upper bound; ignores the cache ratio)"),
    Preset("hybrimoe-oracle", "optimal", "optimal", "mrs", "impact", fill_misses=True, oracle=True,
           description="hybrimoe with the true future routing for prefetch and optimal per-layer plans "
                       "(<= 10 experts, else hybrid); a policy, not a limit: other schedules can beat it "
                       "(the limit is the fluid bound, hybrimoe.sim.bound)"),
]}
# old name -> new name; the old name still works and logs a warning
DEPRECATED = {"oracle": "hybrimoe-oracle"}


def get_preset(name: str) -> Preset:
    if name in DEPRECATED:
        log.warning("policy %r is deprecated (it is not a limit: other schedules beat it); use %r",
                    name, DEPRECATED[name])
        name = DEPRECATED[name]
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(PRESETS)}") from None
