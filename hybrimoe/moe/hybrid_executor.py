"""The hybrid executor: runs one MoE layer's routed experts as the scheduler's Plan says.

    route (done by MoEBlock) -> counts per expert -> copy pipeline's view (landed / in flight, link
    free) + cache lookup (hits/misses, pin) -> Plan
      copy stream : the pipeline's on-demand copies into cache slots (or, when the cache does not keep
                    the expert, e.g. in prefill once the free slots are used, transient buffers),
                    non_blocking from pinned host memory, one event each; after the GPU work is
                    issued, the pipeline's prefetches (slot or staging buffer) and fills
      CPU worker  : plan.cpu_order from the host store, on x copied to the host          -> out_cpu [T,H]
      main stream : plan.gpu_order from slots; a copied expert waits for its copy event  -> out [T,H]
    combine: out + out_cpu (the block adds the shared experts)

Routing weights: experts are grouped by `group_by_expert`, which returns for each expert the FLAT
indices s of its (token, k) assignments in the [T*K] routing; token = s // K and its weight is
weights.view(-1)[s]. Every placement (GPU, copy, CPU) uses the same flat indices, so a CPU expert
can never be given the weight of another top-k position (the bug PAPER.md reports in the public
code: positions within the cached/uncached sub-lists used as positions in the token's top-k list).
T = tokens, H = hidden, K = experts per token.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from hybrimoe.moe.kernels import ExpertView
from hybrimoe.moe.layer import add_rows, group_by_expert

if TYPE_CHECKING:
    from hybrimoe.moe.runtime import HybridRuntime

log = logging.getLogger(__name__)


def _accumulate(out: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, w: torch.Tensor, expert: ExpertView) -> None:
    """out[tokens] += w[:, None] * f(x[tokens]) with f the expert (any format); as ReferenceExecutor."""
    y = expert.forward(x[tokens])  # [N, H]
    add_rows(out, tokens, (y * w[:, None]).to(out.dtype))


class HybridExecutor:
    """`Executor` (see hybrimoe.moe.layer) that places experts on GPU, copy link and CPU by plan."""

    def __init__(self, runtime: HybridRuntime) -> None:
        self.rt = runtime

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], expert_ids [T, K], weights [T, K] -> [T, H] on x's device."""
        rt = self.rt
        k = expert_ids.shape[1]
        ids_host = expert_ids.to("cpu")  # [T, K]; synchronises: the plan needs the counts
        now = rt.layer_started(layer)  # after the sync: the dense gap then includes the device's time for attention
        w_host = weights.to("cpu", torch.float32).reshape(-1)  # [T*K]
        groups = dict(group_by_expert(ids_host))  # expert -> flat indices into [T*K]
        counts = {e: int(s.numel()) for e, s in groups.items()}
        rt.observe_routing(layer, ids_host, w_host.view(ids_host.shape))
        view = rt.pipeline.view(layer, counts, now)
        rt.cache.begin_layer(layer, counts)
        try:
            plan = rt.plan_layer(layer, counts, view, tokens=x.shape[0], now=now)
            assert set(plan.gpu_order) | set(plan.cpu_order) == set(counts), "plan must place every expert once"
            assert len(plan.gpu_order) + len(plan.cpu_order) == len(counts)
            return self._execute(layer, x, groups, w_host, k, plan, counts, now)
        finally:
            rt.cache.end_layer()
            rt.layer_done(layer)
            rt.layer_finished(layer)

    def _execute(self, layer: int, x: torch.Tensor, groups: dict[int, torch.Tensor], w_host: torch.Tensor,
                 k: int, plan: Any, counts: dict[int, int], now: float) -> torch.Tensor:
        rt, dev = self.rt, self.rt.devices
        protect = {(layer, e) for e in groups}
        prefill = rt.is_prefill(x.shape[0])  # a prompt's step, not a batched decode step of B tokens
        dev.copy_waits_for_main()  # a slot evicted below may still be read by earlier main-stream work
        demand = rt.pipeline.demand(layer, plan, now, prefill, protect)
        rt.issue(demand)
        staged = {c.key[1] for c in demand if c.dest == "transient"}  # copied experts the cache does not keep

        future = None
        if plan.cpu_order:
            x_host = x.to("cpu") if dev.is_cuda else x  # [T, H]
            jobs = [(e, groups[e]) for e in plan.cpu_order]
            future = rt.worker.submit(self._cpu_part, layer, x_host, jobs, w_host, k)

        try:
            prepared = rt.prepare_copies(layer, x, plan, now)  # prefetch prediction: gates on x, before the experts
            out = torch.zeros_like(x)  # [T, H]
            if plan.gpu_order:
                self._gpu_part(layer, x, out, groups, w_host, k, plan.gpu_order, staged)
            rt.after_layer(layer, plan, protect, counts, now, x.shape[0], prepared)  # prefetches and fills
        except BaseException:
            if future is not None and not future.cancel():
                future.exception()  # wait: the worker must be done with this layer before the caller goes on
            raise
        if future is not None:
            # pinned on CUDA (see _cpu_part): an async copy, ordered before the add on the main stream; a
            # copy from pageable memory would make the host wait for the GPU part here
            out += future.result().to(out.device, non_blocking=True)
        return out

    def _gpu_part(self, layer: int, x: torch.Tensor, out: torch.Tensor, groups: dict[int, torch.Tensor],
                  w_host: torch.Tensor, k: int, order: tuple[int, ...], staged: set[int]) -> None:
        """Main stream: experts in `order` from cache slots (or staging buffers), accumulated into out."""
        dev, cache, store = self.rt.devices, self.rt.cache, self.rt.store
        flat = torch.cat([groups[e] for e in order])  # [N] flat indices of all GPU assignments
        flat_dev = flat.to(dev.compute, non_blocking=True)
        w_dev = w_host[flat].to(dev.compute, non_blocking=True)  # [N] fp32
        timer = dev.gpu_timer
        timer.start()
        lo = 0
        for e in order:
            hi = lo + groups[e].numel()
            tokens, w = flat_dev[lo:hi] // k, w_dev[lo:hi]
            lo = hi
            if e in staged:
                timer.stop()
                buffer = cache.staging_buffer(layer)
                with dev.copy_context():
                    dev.copy_timer.start()
                    buffer.copy_(store.buffer(layer, e), non_blocking=True)
                    dev.copy_timer.stop()
                    event = dev.record_copy()
                dev.main_waits(event)
                timer.start()
                _accumulate(out, x, tokens, w, store.view(buffer))
                cache.release_staging(buffer)
                continue
            event = cache.take_pending((layer, e))  # this layer's copy, or an earlier fill/prefetch copy
            if event is not None:
                timer.stop()
                dev.main_waits(event)
                timer.start()
            prefetched = cache.staged_weights((layer, e))  # a prefetch the cache did not keep, else its slot
            _accumulate(out, x, tokens, w, prefetched if prefetched is not None else cache.weights((layer, e)))
        timer.stop()

    def _cpu_part(self, layer: int, x: torch.Tensor, jobs: list[tuple[int, torch.Tensor]], w_host: torch.Tensor,
                  k: int) -> torch.Tensor:
        """Worker thread: experts from host memory; returns their weighted sum [T, H] on the host."""
        store = self.rt.store
        with torch.inference_mode(), self.rt.devices.cpu_timer.span():
            out = torch.zeros(x.shape, dtype=x.dtype, pin_memory=self.rt.devices.is_cuda)  # [T, H]
            for e, flat in jobs:
                _accumulate(out, x, flat // k, w_host[flat], store.expert(layer, e))
            return out
