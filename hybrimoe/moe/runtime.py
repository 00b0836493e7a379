"""HybridRuntime: the mechanism that executes the policy's decisions for every MoE layer of a model.

    install_runtime(model, options) -> HybridRuntime                          (hybrimoe.moe.install)
      budget (slots) -> pinned expert store -> GpuExpertCache (CacheState + CachePolicy of the preset)
      -> initial cache content (preset.initial) -> CPU worker thread -> costs (calibrated or given)
      -> HybridExecutor in every MoEBlock; the routing observer feeds router scores to the cache policy

Per layer the executor asks the copy pipeline (hybrimoe.policy.pipeline, the object the simulator
drives too) what is landed and what is still in flight, `plan_layer` for the preset's Plan (a prompt's
step: prefill scheduler when T >= preset.prefill_min_tokens, 2 for most presets and 32 for llama.cpp,
else the decode scheduler; a decode step of B sequences, T = B: the decode scheduler, except for
presets that decide by tokens in decode too: `Preset.scheduler_role`), issues the pipeline's on-demand
copies (the pipeline's prefill rule applies to prompt steps only: `is_prefill`), and
`after_layer` issues its prefetches and fills; `layer_done` frees the layer's staging buffers. The
pipeline's clock is `time.perf_counter()` with the cost model's copy seconds; CUDA events keep every
read after its copy whatever those estimates say. `stats()` returns cache counters, measured busy
seconds of cpu / gpu / copy, and the cost model's predicted seconds of the plans executed.

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
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from hybrimoe.moe.cache import GpuExpertCache
from hybrimoe.moe.devices import Devices
from hybrimoe.moe.hybrid_executor import HybridExecutor
from hybrimoe.policy.link import Copy
from hybrimoe.policy.pipeline import CopyPipeline, LayerView
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


@dataclass
class VirtualClock:
    """The pipeline's clock on the cost model instead of the wall: each MoE layer starts `dense_seconds`
    after the previous one's predicted end (its plan's makespan), as in the simulator with uniform
    dense costs and no LM head. For tests and benchmarks that compare the runtime's copy decisions
    with the simulator's (wall-clock estimates would make them differ)."""

    dense_seconds: float
    last_end: float = 0.0

    def start(self) -> float:
        return self.last_end + self.dense_seconds

    def planned(self, now: float, plan: Plan) -> None:
        self.last_end = now + plan.makespan


class HybridRuntime:
    """Owns devices, cache, CPU worker, schedulers and counters; see the module docstring."""

    def __init__(self, model: Any, preset: Preset, devices: Devices, cache: GpuExpertCache, worker: CpuWorker,
                 costs: Callable[[int], ExpertCosts], pipeline: CopyPipeline, lookahead: Any = None) -> None:
        self.model = model
        self.config = model.config
        self.store = model.expert_store
        self.preset = preset
        self.devices = devices
        self.cache = cache
        self.worker = worker
        self.costs = costs  # layer -> ExpertCosts (seconds)
        self.pipeline = pipeline  # link queue, staging, every copy decision (pure Python)
        self.lookahead = lookahead  # Lookahead (predictions for prefetching) or None
        self.schedulers = {"prefill": get_scheduler(preset.prefill), "decode": get_scheduler(preset.decode)}
        self.executor = HybridExecutor(self)
        self._scores: dict[int, torch.Tensor | None] = {}  # layer -> router scores [T, E] of the pending call
        self._final_stats: dict[str, Any] | None = None  # stats at close()
        self.dense_gap: dict[int, float] = {}  # layer -> seconds from the previous MoE layer's end to this one's
        self._last_end: tuple[int, float] | None = None  # (layer, perf_counter) when the last MoE layer ended
        self.predicted = {"prefill": 0.0, "decode": 0.0}  # sum of plan makespans (s), cost model
        self.layer_calls = {"prefill": 0, "decode": 0}
        self.replay: Any = None  # TraceRouting when --replay-trace is on
        self.virtual_clock: VirtualClock | None = None  # set: the pipeline runs on the cost model's clock
        self.plan_log: list[Plan] | None = None  # set to [] to keep every plan (benchmarks, plots)
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
    def use_virtual_clock(self, dense_seconds: float) -> None:
        """Decide copies on `VirtualClock(dense_seconds)` (dense gaps fixed to it) instead of the wall."""
        self.virtual_clock = VirtualClock(dense_seconds)
        self.dense_gap = {layer: dense_seconds for layer in self.model.moe_blocks}

    def layer_started(self, layer: int) -> float:
        """Records the dense gap before `layer`; returns now (perf_counter seconds), the pipeline's clock."""
        if self.virtual_clock is not None:
            return self.virtual_clock.start()
        now = time.perf_counter()
        if self._last_end is not None and self._last_end[0] < layer:  # same forward pass
            gap = now - self._last_end[1]
            old = self.dense_gap.get(layer)
            self.dense_gap[layer] = gap if old is None else 0.8 * old + 0.2 * gap
        self._last_end = None
        return now

    def layer_finished(self, layer: int) -> None:
        self._last_end = (layer, time.perf_counter())

    # -- planning ---------------------------------------------------------------------------------
    def is_prefill(self, tokens: int) -> bool:
        """Whether the MoE call of `tokens` tokens belongs to a prompt's step: as the model's caller said
        (`MoETransformer.forward_prefill`: a batched decode step of B sequences is not prefill), else (a
        layer run outside a model forward) by its token count."""
        said = getattr(self.model, "forward_prefill", None)
        return tokens > 1 if said is None else said

    def scheduler_for(self, tokens: int) -> Any:
        """The preset's scheduler for a call of `tokens` tokens (`Preset.scheduler_role`): a prompt's by its
        token count (prefill scheduler from `prefill_min_tokens`, llama.cpp: 32, op offload); a decode step
        by `decode`, unless the preset decides by tokens in decode too (llama.cpp, Fiddler)."""
        return self.schedulers[self.preset.scheduler_role(tokens, self.is_prefill(tokens))]

    def plan_layer(self, layer: int, counts: dict[int, int], view: LayerView, tokens: int, now: float) -> Plan:
        """The plan of `scheduler_for(tokens)`; counted under the call's phase (prefill or decode)."""
        phase = "prefill" if self.is_prefill(tokens) else "decode"
        scheduler = self.scheduler_for(tokens)
        plan = self.pipeline.plan(layer, counts, view, scheduler, self.costs(layer))
        if self.virtual_clock is not None:
            self.virtual_clock.planned(now, plan)
        self.predicted[phase] += plan.makespan
        self.layer_calls[phase] += 1
        if self.plan_log is not None:
            self.plan_log.append(plan)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", plan.describe())
        return plan

    def issue(self, copies: list[Copy]) -> None:
        """Put the pipeline's slot and staging copies on the copy stream, in its order (transient
        on-demand copies are issued by the executor when the GPU reaches them)."""
        todo = [c for c in copies if c.dest != "transient"]
        if not todo:
            return
        dev = self.devices
        with dev.copy_context():
            dev.copy_timer.start()
            for c in todo:
                if c.dest == "slot":
                    self.cache.copy_into_slot(c.key)
                else:
                    self.cache.stage(c.key)
            dev.copy_timer.stop()

    def prepare_copies(self, layer: int, x: torch.Tensor, plan: Plan, now: float) -> Any:
        """The prefetch prediction for `after_layer`, started before the layer's GPU work is issued."""
        return self.lookahead.prepare(self, layer, x, plan, now) if self.lookahead is not None else None

    def after_layer(self, layer: int, plan: Plan, protect: set[tuple[int, int]], counts: dict[int, int],
                    now: float, tokens: int, prepared: Any = None) -> None:
        """After the layer's own work is issued: the pipeline's prefetches (from `prepared`) and fills;
        their events are waited for at the experts' use."""
        future = self.pipeline.future(layer)
        predicted = self.lookahead.predicted(prepared) if self.lookahead is not None else {}
        next_gap = self.dense_gap.get(future[0], 0.0) if future else 0.0
        self.issue(self.pipeline.idle(layer, plan, now, predicted, next_gap, lambda f: self.dense_gap.get(f, 0.0),
                                      self.scheduler_for(tokens), protect, counts, prefill=self.is_prefill(tokens)))

    def layer_done(self, layer: int) -> None:
        """The layer's work is issued: its staging buffers are free once the main stream has read them."""
        self.cache.unstage(self.pipeline.layer_done(layer))

    # -- results ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Cache counters, busy seconds {cpu, gpu, copy} (measured), predicted seconds (cost model)."""
        if self._final_stats is not None:
            return self._final_stats
        return {"policy": self.preset.name, "device": str(self.devices.compute), "cpu_threads": self.worker.threads,
                "cache": self.cache.counters(), "busy_seconds": self.devices.busy_seconds(),
                "predicted_seconds": dict(self.predicted), "layer_calls": dict(self.layer_calls),
                "extra_copies": self.extra_copies, "staging_slots": self.pipeline.link.staging_slots,
                "prefetch": self.lookahead.describe(self) if self.lookahead is not None else "none"}

    @property
    def extra_copies(self) -> dict[str, int]:
        """Copies the plans did not ask for: fills of CPU-computed misses and prefetches."""
        copies = self.pipeline.link.copies
        return {"fill_misses": copies["fill"], "prefetch": copies["prefetch"]}

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
        self.lookahead = None

