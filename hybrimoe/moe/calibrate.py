"""Quick warm-up calibration of the scheduler's expert costs on the machine at hand.

Measures, with the runtime's own kernels and devices (a few ms on tiny models, ~1 s on real ones):
    gpu(n)  = gpu_fixed + gpu_per_token * n       expert_forward on the compute device, n in {1, N}
    cpu(n)  = cpu_fixed + cpu_per_token * n       expert_forward on the CPU worker thread, n in {1, N}
              (+ cpu_first_extra for the first CPU expert of a layer: cold weights minus warm weights)
    copy()  = copy_seconds                        one expert host -> compute device (copy stream)
and returns a `hybrimoe.policy.plan.LinearCosts` (seconds). Alternatively a CostModel profile
(`--cost-profile`) gives the costs: `profile_costs`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from hybrimoe.moe.devices import Devices
from hybrimoe.moe.store import ExpertStore
from hybrimoe.policy.plan import ExpertCosts, LinearCosts

log = logging.getLogger(__name__)


def _timed(fn: Callable[[], Any], devices: Devices | None, repeats: int) -> float:
    """Fastest seconds of fn() over `repeats` runs after one warm-up (synchronising CUDA around each):
    the minimum is the least disturbed by other processes."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if devices is not None:
            devices.synchronize()
        start = time.perf_counter()
        fn()
        if devices is not None:
            devices.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_costs(store: ExpertStore, devices: Devices, worker: Any, tokens: int = 32,
                    repeats: int = 5) -> LinearCosts:
    layer = store.layers[0]
    host = store.expert(layer, 0)
    device_buffer = store.buffer(layer, 0).to(devices.compute)
    dev = store.view(device_buffer)  # the stored bytes, computed from on the device (any format)
    x_dev = {n: torch.randn(n, store.hidden, dtype=store.compute_dtype, device=devices.compute) for n in (1, tokens)}
    x_host = {n: t.to("cpu") for n, t in x_dev.items()}

    with torch.inference_mode():
        gpu = {n: _timed(lambda n=n: dev.forward(x_dev[n]), devices, repeats)
               for n in (1, tokens)}

        def copy_once() -> None:
            with devices.copy_context():
                device_buffer.copy_(store.buffer(layer, 0), non_blocking=True)

        copy = _timed(copy_once, devices, repeats)

    def cpu_side() -> tuple[dict[int, float], float]:
        with torch.inference_mode():
            warm = {n: _timed(lambda n=n: host.forward(x_host[n]), None, repeats) for n in (1, tokens)}
            cold_expert = store.expert(layer, min(1, store.config.num_experts - 1))
            start = time.perf_counter()
            cold_expert.forward(x_host[1])
            cold = time.perf_counter() - start
        return warm, max(0.0, cold - warm[1])

    cpu, first_extra = worker.submit(cpu_side).result()
    per_token_gpu = max(0.0, (gpu[tokens] - gpu[1]) / (tokens - 1))
    per_token_cpu = max(1e-12, (cpu[tokens] - cpu[1]) / (tokens - 1))
    costs = LinearCosts(cpu_per_token=per_token_cpu, gpu_fixed=max(0.0, gpu[1] - per_token_gpu),
                        copy_seconds=copy, cpu_fixed=max(0.0, cpu[1] - per_token_cpu),
                        cpu_first_extra=first_extra, gpu_per_token=per_token_gpu)
    log.info("calibrated costs (ms): gpu(1) %.3f gpu(%d) %.3f cpu(1) %.3f cpu(%d) %.3f copy %.3f",
             gpu[1] * 1e3, tokens, gpu[tokens] * 1e3, cpu[1] * 1e3, tokens, cpu[tokens] * 1e3, copy * 1e3)
    return costs


def profile_costs(profile: str, store: ExpertStore) -> ExpertCosts:
    """ExpertCosts of a CostModel profile (name or path) for this store's expert shape and format: the
    bytes a copy moves and the CPU reads are the store's own (scales included), whatever bits the
    profile was written for."""
    from hybrimoe.policy.cost import CostModel, ExpertCostTable
    from hybrimoe.policy.shape import ExpertShape

    model = CostModel.load(profile)
    shape = ExpertShape(store.hidden, store.intermediate,
                        bits=8.0 * store.expert_nbytes / (3 * store.hidden * store.intermediate))
    return ExpertCostTable(model, shape, shape)
