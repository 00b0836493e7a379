"""Intra-layer schedulers: decide, for one MoE layer, which activated expert runs where.

Every scheduler has the same call (`Scheduler.plan`) and returns a `Plan` (see plan.py). Inputs:
`counts` {expert: tokens routed to it in this forward pass} (only activated experts), `cached` the
experts of this layer resident on the GPU (others live in host memory), `costs` the layer's
`ExpertCosts`, when each resource becomes free (seconds from the layer's MoE start), and
`arrivals` {expert: seconds}: uncached experts whose copy was issued before this layer (a prefetch
still in flight on the link, hybrimoe.policy.link). Such an expert runs on the GPU once it has
arrived, or on the CPU when that finishes sooner; it is never copied again.

Shared experts are NOT part of a plan: they are dense GPU work, charged with attention in the
layer's dense time before the routed experts start (simulator and runtime alike).

Registry: `get_scheduler(name)`; an unknown name raises ConfigError listing the known ones.
"""

from __future__ import annotations

from typing import Callable, Protocol

from hybrimoe.errors import ConfigError
from hybrimoe.policy.hybrid import HybridScheduler
from hybrimoe.policy.order import by_load_asc, by_load_desc, worth_waiting
from hybrimoe.policy.plan import ExpertCosts, Plan, build_plan


class Scheduler(Protocol):
    name: str

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        ...


class GpuOnlyScheduler:
    """Every activated expert on the GPU; uncached ones copied first (highest count first).

    gpu-lru / AdapMoE, and kTransformers' prefill (which sends every expert to the GPU).
    """

    name = "gpu-only"

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        arrivals = {e: a for e, a in (arrivals or {}).items() if e in counts and e not in cached}
        copies = by_load_desc([e for e in counts if e not in cached and e not in arrivals], counts)
        gpu = by_load_desc([e for e in counts if e in cached], counts) + sorted(arrivals, key=lambda e: (arrivals[e], e)) \
            + copies
        return build_plan(layer, counts, gpu, copies, [], costs, copy_free_at, gpu_free_at, cpu_free_at, arrivals)


class CpuOnMissScheduler:
    """Cached experts on the GPU, uncached on the CPU, no copies (kTransformers / Fiddler decode)."""

    name = "cpu-on-miss"

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        landed = worth_waiting(counts, cached, costs, arrivals)
        gpu = by_load_desc([e for e in counts if e in cached], counts) + sorted(landed, key=lambda e: (landed[e], e))
        cpu = by_load_asc([e for e in counts if e not in cached and e not in landed], counts)
        return build_plan(layer, counts, gpu, [], cpu, costs, copy_free_at, gpu_free_at, cpu_free_at, landed)


class StaticLayerScheduler:
    """llama.cpp's layer mapping: a layer whose activated experts are all cached runs wholly on the
    GPU; any other layer runs wholly on the CPU (its experts stay in host memory)."""

    name = "static-layer"

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        if all(e in cached for e in counts):
            return build_plan(layer, counts, by_load_desc(counts, counts), [], [], costs,
                              copy_free_at, gpu_free_at, cpu_free_at)
        return build_plan(layer, counts, [], [], by_load_asc(counts, counts), costs,
                          copy_free_at, gpu_free_at, cpu_free_at)


class FiddlerPrefillScheduler:
    """Fiddler's per-miss choice: for each uncached expert (highest count first), copy it and run
    it on the GPU if copy + GPU time is below its CPU time, else run it on the CPU. Cached experts
    run on the GPU. The decision is per expert, from cost estimates, not a joint schedule."""

    name = "fiddler-prefill"

    def plan(self, layer: int, counts: dict[int, int], cached: set[int], costs: ExpertCosts,
             copy_free_at: float = 0.0, gpu_free_at: float = 0.0, cpu_free_at: float = 0.0,
             arrivals: dict[int, float] | None = None) -> Plan:
        landed = worth_waiting(counts, cached, costs, arrivals)
        copies, cpu = [], []
        for e in by_load_desc([e for e in counts if e not in cached and e not in landed], counts):
            if costs.copy() + costs.gpu(counts[e]) < costs.cpu(counts[e], False):
                copies.append(e)
            else:
                cpu.append(e)
        gpu = by_load_desc([e for e in counts if e in cached], counts) + sorted(landed, key=lambda e: (landed[e], e)) + copies
        return build_plan(layer, counts, gpu, copies, by_load_asc(cpu, counts), costs,
                          copy_free_at, gpu_free_at, cpu_free_at, landed)


def _greedy() -> Scheduler:
    from hybrimoe.policy.greedy import GreedyHybridScheduler

    return GreedyHybridScheduler()


def _optimal() -> Scheduler:
    from hybrimoe.policy.optimal import OptimalScheduler

    return OptimalScheduler(fallback=HybridScheduler())


SCHEDULERS: dict[str, Callable[[], Scheduler]] = {
    "hybrid": HybridScheduler,
    "hybrid-greedy": _greedy,
    "gpu-only": GpuOnlyScheduler,
    "cpu-on-miss": CpuOnMissScheduler,
    "static-layer": StaticLayerScheduler,
    "fiddler-prefill": FiddlerPrefillScheduler,
    "optimal": _optimal,
}


def get_scheduler(name: str) -> Scheduler:
    """A new scheduler by registry name; ConfigError listing the known names otherwise."""
    try:
        factory = SCHEDULERS[name]
    except KeyError:
        raise ConfigError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}") from None
    return factory()
