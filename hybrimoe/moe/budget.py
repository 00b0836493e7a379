"""Device-memory budget of the hybrid runtime: how many expert slots, checked before any weight loads.

    dense bytes   = every parameter and buffer of the model except routed experts (attention, norms,
                    embeddings, lm_head, routers, shared experts, dense MLP layers), counted on a
                    meta-device copy of the model built from the config alone (no memory, no weights)
    expert bytes  = one routed expert in its format: 3 * I * H * dtype bytes for float experts, the
                    int8/int4 codes plus their scales otherwise (hybrimoe.moe.expert_layout.expert_nbytes)
    slots         = from --cache-ratio (ratio * all routed experts), --expert-cache (bytes // expert
                    bytes), --gpu-memory (whatever the dense part leaves), or the preset's ratio
A budget that cannot hold the dense part, or a nonzero cache budget below one expert, is a
BudgetError naming the numbers. The prefetch staging buffers (`--staging-slots`, presets that
prefetch) are counted: --gpu-memory holds dense + staging + cache. The KV cache, activations and
the cache's two transient buffers (two experts, allocated at the first on-demand copy the cache does
not keep) are not (a few % at most for the context lengths this engine runs); leave headroom in
--gpu-memory for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import BudgetError
from hybrimoe.moe.expert_layout import expert_nbytes
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.runtime_options import DEFAULT_CACHE_RATIO, RuntimeOptions

log = logging.getLogger(__name__)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def dense_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's non-expert weights in `dtype` (routers stay fp32), from the config only."""
    from hybrimoe.loader import build_empty_model

    with torch.device("meta"):
        model = build_empty_model(config, dtype)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params + buffers


@dataclass(frozen=True)
class CacheBudget:
    slots: int  # expert slots in total
    layer_capacity: dict[int, int] | None  # per-layer slots (per_layer_cache), else None = global pool
    expert_bytes: int  # bytes of one routed expert
    dense_bytes: int  # bytes of the non-expert weights on the device
    total_experts: int  # routed experts of the model (MoE layers x experts)
    staging_slots: int = 0  # prefetch staging buffers (experts) beside the cache

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes

    @property
    def ratio(self) -> float:
        return self.slots / self.total_experts if self.total_experts else 0.0

    def describe(self) -> str:
        scope = "per layer" if self.layer_capacity is not None else "global"
        staging = f" + {self.staging_slots} staging ({_gb(self.staging_slots * self.expert_bytes)})" \
            if self.staging_slots else ""
        return (f"dense {_gb(self.dense_bytes)} + expert cache {self.slots}/{self.total_experts} experts "
                f"({self.ratio:.0%}, {_gb(self.cache_bytes)}, {scope}){staging}")


def split_per_layer(slots: int, layers: tuple[int, ...]) -> dict[int, int]:
    """slots // layers each; the remainder goes one each to the first layers."""
    base, extra = divmod(slots, len(layers)) if layers else (0, 0)
    return {layer: base + (1 if i < extra else 0) for i, layer in enumerate(layers)}


def plan_budget(config: ModelConfig, dtype: torch.dtype, options: RuntimeOptions,
                preset_ratio: float | None = None, device_free_bytes: int | None = None,
                dense: int | None = None, staging_slots: int = 0, fmt: ExpertFormat | None = None) -> CacheBudget:
    """Number of expert slots for `options`; BudgetError when the budget cannot work.

    `dtype`: the model's (dense weights') dtype; `fmt`: the routed experts' format (None = `dtype`),
    whose bytes per expert every cache size counts;
    `preset_ratio`: the policy preset's own cache ratio (used when no size is given);
    `device_free_bytes`: free memory of the device (CUDA), checked against dense + cache;
    `dense`: precomputed dense bytes (else computed from the config); `staging_slots`: prefetch
    staging buffers (experts) that share the device with the cache.
    """
    fmt = fmt if fmt is not None else ExpertFormat.parse(None, dtype)
    expert_bytes = expert_nbytes(fmt, config.moe_intermediate_size, config.hidden_size)
    total = len(config.moe_layers) * config.num_experts
    dense = dense_bytes(config, dtype) if dense is None else dense
    staging = staging_slots * expert_bytes
    gpu_memory = options.gpu_memory_bytes
    if gpu_memory is not None and gpu_memory < dense:
        raise BudgetError(f"--gpu-memory {_gb(gpu_memory)} cannot hold the dense part of the model "
                          f"({_gb(dense)}: attention, embeddings, norms, routers, shared experts); "
                          f"give at least {_gb(dense)} plus the expert cache")
    if options.cache_ratio is not None:
        slots = round(options.cache_ratio * total)
    elif options.expert_cache_bytes is not None:
        if 0 < options.expert_cache_bytes < expert_bytes:
            raise BudgetError(f"--expert-cache {options.expert_cache_bytes} bytes cannot hold one routed expert "
                              f"({expert_bytes} bytes); give 0 or at least {expert_bytes}")
        slots = options.expert_cache_bytes // expert_bytes
    elif gpu_memory is not None:
        slots = max(0, gpu_memory - dense - staging) // expert_bytes
    else:
        slots = round((DEFAULT_CACHE_RATIO if preset_ratio is None else preset_ratio) * total)
    slots = max(0, min(slots, total))
    if gpu_memory is not None and dense + staging + slots * expert_bytes > gpu_memory:
        raise BudgetError(f"dense part {_gb(dense)} + {staging_slots} staging + expert cache {slots} x {expert_bytes} "
                          f"bytes ({fmt.describe()}) = {_gb(dense + staging + slots * expert_bytes)} exceeds "
                          f"--gpu-memory {_gb(gpu_memory)}")
    if device_free_bytes is not None and dense + staging + slots * expert_bytes > device_free_bytes:
        raise BudgetError(f"dense part {_gb(dense)} + staging {_gb(staging)} + expert cache {_gb(slots * expert_bytes)} "
                          f"do not fit in the device's free memory {_gb(device_free_bytes)}; lower "
                          f"--expert-cache/--cache-ratio/--staging-slots")
    layer_capacity = split_per_layer(slots, tuple(config.moe_layers)) if options.per_layer_cache else None
    budget = CacheBudget(slots, layer_capacity, expert_bytes, dense, total, staging_slots)
    log.info("budget: %s", budget.describe())
    return budget


def device_free_bytes(device: str | torch.device) -> int | None:
    """Free memory of a CUDA device (bytes), None for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
