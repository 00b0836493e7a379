"""HybridRuntime: the mechanism that executes the policy's decisions for every MoE layer of a model.

    install_runtime(model, options) -> HybridRuntime                          (hybrimoe.moe.install)
      budget (slots) -> pinned expert store -> GpuExpertCache (CacheState + CachePolicy of the preset)
      -> initial cache content (preset.initial) -> CPU worker thread -> costs (calibrated or given)
      -> HybridExecutor in every MoEBlock; the routing observer feeds router scores to the cache policy

Per layer the executor asks `plan_layer` for the preset's Plan (prefill scheduler when T >=
preset.prefill_min_tokens, 2 for most presets and 32 for llama.cpp, else the decode scheduler) given
the counts and the cache's contents; `after_layer` then issues optional copies in the link's idle
time (fill_misses, prefetch). `stats()` returns cache counters, measured busy seconds of cpu / gpu /
copy, and the cost model's predicted seconds of the plans executed.

CPU worker threads: `torch.set_num_threads` is process-global in name, but with the OpenMP backend
(the backend of the official CPU and CUDA wheels) it sets the *calling thread's* OpenMP team size and
a global default that threads read once, at their first parallel region. So the worker calls it
once at start (its own team = cpu_threads) and the installing thread then calls it again with its
own previous count, which restores the default for every other thread. Checked by a test. With a
non-OpenMP backend (native thread pool) the setting is truly global: a warning is logged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from hybrimoe.moe.cache import GpuExpertCache
from hybrimoe.moe.devices import Devices
from hybrimoe.moe.hybrid_executor import HybridExecutor
from hybrimoe.policy.plan import ExpertCosts, Plan
from hybrimoe.policy.presets import Preset
from hybrimoe.policy.schedule import get_scheduler

log = logging.getLogger(__name__)


class CpuWorker:
    """One long-lived host thread for CPU experts, with its own torch (OpenMP) thread count."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrimoe-cpu")
        caller_threads = torch.get_num_threads()
        self._pool.submit(self._init_thread, threads).result()
        torch.set_num_threads(caller_threads)  # restore the default for every other thread (see module doc)
        if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
            log.warning("torch's parallel backend is not OpenMP: --cpu-threads %d applies to every thread", threads)
        self.thread_count = self._pool.submit(torch.get_num_threads).result()

    @staticmethod
    def _init_thread(threads: int) -> None:
        torch.get_num_threads()  # torch initialises a thread's count lazily from the global default: do it now,
        torch.set_num_threads(threads)  # so that this thread-local setting is not overwritten later

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # "<quota> <period>" or "max <period>" (cgroup v2)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    `--cpus`). os.cpu_count() alone counts every core of the host, e.g. 192 in a 16-core container."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(CGROUP_CPU_MAX, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_cpu_threads() -> int:
    return max(1, usable_cores() - 1)


class HybridRuntime:
    """Owns devices, cache, CPU worker, schedulers and counters; see the module docstring."""

    def __init__(self, model: Any, preset: Preset, devices: Devices, cache: GpuExpertCache, worker: CpuWorker,
                 costs: Callable[[int], ExpertCosts], prefetcher: Any = None) -> None:
        self.model = model
        self.config = model.config
        self.store = model.expert_store
        self.preset = preset
        self.devices = devices
        self.cache = cache
        self.worker = worker
        self.costs = costs  # layer -> ExpertCosts (seconds)
        self.prefetcher = prefetcher
        self.schedulers = {"prefill": get_scheduler(preset.prefill), "decode": get_scheduler(preset.decode)}
        self.executor = HybridExecutor(self)
        self._scores: dict[int, torch.Tensor | None] = {}  # layer -> router scores [T, E] of the pending call
        self._final_stats: dict[str, Any] | None = None  # stats at close()
        self.dense_gap: dict[int, float] = {}  # layer -> seconds from the previous MoE layer's end to this one's
        self._last_end: tuple[int, float] | None = None  # (layer, perf_counter) when the last MoE layer ended
        self.predicted = {"prefill": 0.0, "decode": 0.0}  # sum of plan makespans (s), cost model
        self.layer_calls = {"prefill": 0, "decode": 0}
        self.replay: Any = None  # TraceRouting when --replay-trace is on
        self.plan_log: list[Plan] | None = None  # set to [] to keep every plan (benchmarks, plots)
        self.extra_copies = {"fill_misses": 0, "prefetch": 0}
        self._previous_observer = model.routing_observer
        self._previous_executors = {i: b.executor for i, b in model.moe_blocks.items()}

    # -- routing observation -------------------------------------------------------------------------
    def observe(self, layer: int, record: Any) -> None:
        """The model's routing observer: keeps the router scores for the cache policy, then chains."""
        self._scores[layer] = record.scores
        if self._previous_observer is not None:
            self._previous_observer(layer, record)

    def set_scores(self, layer: int, scores: torch.Tensor | None) -> None:
        """Scores [T, E] (or None = unknown) the cache policy sees for the layer's next call (replay)."""
        self._scores[layer] = scores

    def observe_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Feeds the cache policy once per token: scores (when known), selected experts, weights."""
        scores = self._scores.pop(layer, None)
        policy = self.cache.state.policy
        if scores is not None and getattr(policy, "name", "") == "mrs":
            # MRS keeps only TopP(s), p = policy.p: hand it the p best (expert, score) pairs per token,
            # found by torch.topk, instead of E scores it would sort in Python (same update, O(p) per token).
            top_scores, top_ids = torch.topk(scores.to(torch.float32), min(policy.p, scores.shape[-1]), dim=-1)
            for selected, s in zip(top_ids.tolist(), top_scores.tolist()):
                policy.observe(layer, None, selected, s)
            return
        score_rows = scores.to("cpu", torch.float32).tolist() if scores is not None else None
        for t, (selected, w) in enumerate(zip(ids.tolist(), weights.tolist())):
            policy.observe(layer, score_rows[t] if score_rows is not None else None, selected, w)

    # -- timing of the dense part between MoE layers ------------------------------------------------
    def layer_started(self, layer: int) -> None:
        now = time.perf_counter()
        if self._last_end is not None and self._last_end[0] < layer:  # same forward pass
            gap = now - self._last_end[1]
            old = self.dense_gap.get(layer)
            self.dense_gap[layer] = gap if old is None else 0.8 * old + 0.2 * gap
        self._last_end = None

    def layer_finished(self, layer: int) -> None:
        self._last_end = (layer, time.perf_counter())

    # -- planning ---------------------------------------------------------------------------------
    def plan_layer(self, layer: int, counts: dict[int, int], cached: set[int], tokens: int) -> Plan:
        """The preset's plan for a call of `tokens` tokens: its prefill scheduler for at least
        `preset.prefill_min_tokens` tokens, else its decode scheduler (llama.cpp: 32, op offload)."""
        phase = "prefill" if tokens > 1 else "decode"
        scheduler = self.schedulers["prefill" if self.preset.uses_prefill_scheduler(tokens) else "decode"]
        plan = scheduler.plan(layer, counts, cached, self.costs(layer))
        self.predicted[phase] += plan.makespan
        self.layer_calls[phase] += 1
        if self.plan_log is not None:
            self.plan_log.append(plan)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", plan.describe())
        return plan

    def prepare_copies(self, layer: int, x: torch.Tensor, plan: Plan) -> Any:
        """The prefetcher's prediction for `after_layer`, started before the layer's GPU work is issued."""
        return self.prefetcher.prepare(self, layer, x, plan) if self.prefetcher is not None else None

    def after_layer(self, layer: int, x: torch.Tensor, plan: Plan, protect: set[tuple[int, int]],
                    prepared: Any = None) -> None:
        """Optional copies after the layer's own work is issued: CPU-computed misses the policy values
        above their victim (preset.fill_misses), then prefetches (`prepared` by `prepare_copies`). They
        only use slots (never staging); their events are waited for at the experts' next use."""
        state, dev = self.cache.state, self.devices
        fill = [(layer, e) for e in plan.cpu_order if (layer, e) not in state] if self.preset.fill_misses else []
        fetch, keep = self.prefetcher(self, layer, x, plan, protect, prepared) if self.prefetcher is not None \
            else ([], set())
        if not fill and not fetch:
            return
        with dev.copy_context():
            dev.copy_timer.start()
            for key in fill:
                slot = self.cache.admit(key[0], key[1], protect, by_value=True)
                if slot is not None:
                    self.cache.copy_into_slot(key, slot)
                    self.extra_copies["fill_misses"] += 1
            taken: set[tuple[int, int]] = set()
            for key in fetch:
                slot = self.cache.admit(key[0], key[1], protect | keep | taken)
                if slot is not None:
                    self.cache.copy_into_slot(key, slot)
                    self.extra_copies["prefetch"] += 1
                    taken.add(key)
            dev.copy_timer.stop()

    # -- results ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Cache counters, busy seconds {cpu, gpu, copy} (measured), predicted seconds (cost model)."""
        if self._final_stats is not None:
            return self._final_stats
        return {"policy": self.preset.name, "device": str(self.devices.compute), "cpu_threads": self.worker.threads,
                "cache": self.cache.counters(), "busy_seconds": self.devices.busy_seconds(),
                "predicted_seconds": dict(self.predicted), "layer_calls": dict(self.layer_calls),
                "extra_copies": dict(self.extra_copies),
                "prefetch": self.prefetcher.describe(self) if self.prefetcher is not None else "none"}

    def metrics(self) -> dict[str, float]:
        """Flat numeric counters for Engine.stats() / the server's /metrics (names prefixed `runtime_`)."""
        stats = self.stats()
        cache = stats["cache"]
        out = {f"runtime_cache_{k}": float(cache[k]) for k in
               ("slots", "resident", "hits", "misses", "hit_rate", "inserts", "staged", "evictions", "bytes_copied")}
        out.update({f"runtime_busy_{k}_seconds": float(v) for k, v in stats["busy_seconds"].items()})
        out.update({f"runtime_predicted_{k}_seconds": float(v) for k, v in stats["predicted_seconds"].items()})
        out.update({f"runtime_{k}_copies": float(v) for k, v in stats["extra_copies"].items()})
        return out

    def reset_stats(self) -> None:
        """Zero timers and predicted sums (cache counters are cumulative: see cache.counters())."""
        self.devices.synchronize()
        self.devices.reset_timers()
        self.predicted = {"prefill": 0.0, "decode": 0.0}
        self.layer_calls = {"prefill": 0, "decode": 0}

    def close(self) -> None:
        """Puts the previous executors and observer back, stops the worker and frees the cache's device
        memory (stats() stays readable; the runtime cannot run layers afterwards)."""
        for i, block in self.model.moe_blocks.items():
            block.executor = self._previous_executors[i]
        self.model.routing_observer = self._previous_observer
        self.worker.close()
        self._final_stats = self.stats()
        self.cache.release()
        self.prefetcher = None

