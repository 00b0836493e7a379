"""Putting the hybrid runtime into a model: `install_runtime(model, options) -> HybridRuntime`.

Steps (each a function here, so the Engine can call the pre-load check on its own):
  check_budget_before_load(config, dtype, options)   BudgetError before any weight is read
  load_dummy_model(options, dtype)                   --dummy-weights: random weights for a config.json
  install_runtime(model, options)                    pin store, slots, cache content, worker, costs,
                                                     executors (and --replay-trace routing)
  load_with_runtime(model_dir, dtype, options)       all of the above in order (what the Engine calls)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import ConfigError
from hybrimoe.moe.budget import CacheBudget, device_free_bytes, plan_budget
from hybrimoe.moe.cache import GpuExpertCache
from hybrimoe.moe.calibrate import calibrate_costs, profile_costs
from hybrimoe.moe.devices import Devices
from hybrimoe.moe.layer import ReferenceExecutor
from hybrimoe.moe.lookahead import Lookahead
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.moe.replay import TraceRouting, install_replay
from hybrimoe.moe.runtime import CpuWorker, HybridRuntime, default_cpu_threads
from hybrimoe.moe.store import ExpertStore
from hybrimoe.policy.cache_policy import StaticPolicy, make_policy
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.pipeline import CopyPipeline
from hybrimoe.policy.plan import ExpertCosts
from hybrimoe.policy.prefetch import get_prefetcher
from hybrimoe.policy.presets import Preset, get_preset, initial_content, llamacpp_placement
from hybrimoe.runtime_options import RuntimeOptions, dummy_config_path

log = logging.getLogger(__name__)


def _preset_ratio(preset: Preset) -> float | None:
    return 1.0 if preset.initial == "all" else None


def staging_slots(preset: Preset, options: RuntimeOptions) -> int:
    """Prefetch staging buffers the preset uses (none without prefetching)."""
    return options.staging_slots if preset.prefetch != "none" else 0


def check_budget_before_load(config: ModelConfig, dtype: torch.dtype, options: RuntimeOptions,
                             fmt: ExpertFormat | None = None) -> CacheBudget:
    """The budget for `options` from the config alone (experts in `fmt`, default `dtype`); BudgetError
    (with the numbers) if it cannot work."""
    preset = get_preset(options.policy)
    device = options.resolved_device()
    resident = preset.initial == "all"
    opts = options.with_changes(cache_ratio=1.0, expert_cache_bytes=None) if resident else options
    return plan_budget(config, dtype, opts, _preset_ratio(preset), device_free_bytes(device),
                       staging_slots=staging_slots(preset, options), fmt=fmt)


def load_dummy_model(options: RuntimeOptions, dtype: str | torch.dtype = "bf16", expert_dtype: str | None = None,
                     int4_group: int | None = None, dense_dtype: str | None = None,
                     lm_head_dtype: str | None = None) -> Any:
    """--dummy-weights: a MoETransformer with random weights for the config (checked against the budget first)."""
    from hybrimoe.loader import build_dummy_model, expert_format, parse_dtype

    assert options.dummy_weights is not None
    config = _config_from_file(dummy_config_path(options.dummy_weights))
    check_budget_before_load(config, parse_dtype(dtype), options, expert_format(dtype, expert_dtype, int4_group))
    pin = options.pin_memory if options.pin_memory is not None else options.resolved_device().startswith("cuda")
    return build_dummy_model(config, dtype, seed=options.seed, pin_memory=pin, expert_dtype=expert_dtype,
                             int4_group=int4_group, dense_dtype=dense_dtype, lm_head_dtype=lm_head_dtype)


def load_with_runtime(model_dir: str | None, dtype: str, options: RuntimeOptions,
                      progress: bool = True, expert_dtype: str | None = None,
                      int4_group: int | None = None, dense_dtype: str | None = None,
                      lm_head_dtype: str | None = None, cpu_kernel: str = "torch") -> tuple[Any, HybridRuntime]:
    """Budget check (before any weight is read) -> checkpoint (or --dummy-weights) with the expert store
    pinned on CUDA, experts in `expert_dtype` (None = `dtype`), dense linears in `dense_dtype` and
    lm_head in `lm_head_dtype` (None = `dtype`) -> dense part on the device -> CPU int4 kernel
    `cpu_kernel` (before the runtime calibrates the CPU) -> runtime installed. Returns (model, runtime)."""
    from hybrimoe.loader import expert_format, load_model, parse_dtype
    from hybrimoe.moe.cpu_kernels import apply_cpu_kernel

    device = options.resolved_device()
    options = options.with_changes(device=device)
    if options.dummy_weights is not None:
        model = load_dummy_model(options, dtype, expert_dtype, int4_group, dense_dtype, lm_head_dtype).to(device)
    else:
        if model_dir is None:
            raise ConfigError("give a model directory or --dummy-weights CONFIG_JSON")
        check_budget_before_load(ModelConfig.from_pretrained(model_dir), parse_dtype(dtype), options,
                                 expert_format(dtype, expert_dtype, int4_group))
        pin = options.pin_memory if options.pin_memory is not None else device.startswith("cuda")
        model = load_model(model_dir, dtype=dtype, device=device, progress=progress, pin_memory=pin,
                           expert_dtype=expert_dtype, int4_group=int4_group, dense_dtype=dense_dtype,
                           lm_head_dtype=lm_head_dtype)
    from hybrimoe.moe.runtime import default_cpu_threads

    apply_cpu_kernel(model, cpu_kernel, progress, threads=options.cpu_threads or default_cpu_threads())
    return model, install_runtime(model, options)


def _config_from_file(path: str) -> ModelConfig:
    import json

    with open(path, encoding="utf-8") as f:
        return ModelConfig.from_dict(json.load(f))


def model_dense_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (its dense part: the expert store is neither). Equal to
    `dense_bytes(config, dtype)` for float dense weights, smaller with --dense-dtype int8/int4."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def pin_store(store: ExpertStore) -> None:
    """Moves the expert store into page-locked host memory (`ExpertStore.pin`; callers must take
    `buffer()` views after this). No-op for an already pinned store."""
    store.pin()


def install_runtime(model: Any, options: RuntimeOptions, costs: ExpertCosts | None = None,
                    frequency: dict[tuple[int, int], float] | None = None) -> HybridRuntime:
    """Swap the hybrid executor into every MoE block of `model`; returns the runtime (stats(), close()).

    costs: the scheduler's ExpertCosts (default: --cost-profile, else a quick calibration here);
    frequency: {(layer, expert): activations} for the initial hot set (default: the replay trace's).
    """
    preset = get_preset(options.policy)
    config, store = model.config, model.expert_store
    if any(not isinstance(b.executor, ReferenceExecutor) for b in model.moe_blocks.values()):
        raise ConfigError("the model's MoE blocks already run another executor (a hybrid runtime or a replay); "
                          "close() that runtime before installing another")
    device = torch.device(options.resolved_device(str(model.device)))
    if model.device != device:
        model.to(device)  # dense weights; the expert store is not a module buffer and stays on the host
    devices = Devices.create(device)
    if devices.is_cuda and options.pin_memory is not False:
        pin_store(store)
    routing = None
    if options.replay_trace is not None:
        routing = TraceRouting.load(options.replay_trace, config.moe_layers, config.num_experts)
        frequency = routing.frequency() if frequency is None else frequency
    dense = model_dense_bytes(model)  # as loaded: int8/int4 dense linears count their stored bytes
    free = device_free_bytes(device)
    resident = preset.initial == "all"
    opts = options.with_changes(cache_ratio=1.0, expert_cache_bytes=None) if resident else options
    budget = plan_budget(config, store.compute_dtype, opts, _preset_ratio(preset),
                         None if free is None else free + dense, dense,  # dense already on the device
                         staging_slots=staging_slots(preset, options), fmt=store.format)
    assert budget.expert_bytes == store.expert_nbytes, (budget.expert_bytes, store.expert_nbytes)
    policy_options: dict[str, Any] = {}
    # no warm-up trace: a "hot" static cache fills on first use, then freezes
    keys, capacity, layer_capacity = initial_content(preset, list(config.moe_layers), config.num_experts,
                                                     budget.slots, frequency or {}, budget.layer_capacity)
    if preset.initial == "last-layers":
        n_cpu_moe, gpu_layers = llamacpp_placement(list(config.moe_layers), config.num_experts, capacity)
        log.info("%s: routed experts of MoE layers %s on the GPU (llama.cpp -ngl 99 --n-cpu-moe %d)",
                 preset.name, gpu_layers, n_cpu_moe)
    if preset.cache == "static":
        policy_options = {"hot": (), "frequency": frequency or {}}
    policy = make_policy(preset.cache, top_k=config.top_k, **policy_options)
    state = CacheState(capacity, policy, expert_bytes=store.expert_nbytes, layer_capacity=layer_capacity)
    cache = GpuExpertCache(store, devices, state, budget.staging_slots)
    for key, slot in cache.preload(keys):
        slot.copy_(store.buffer(*key))
    if isinstance(policy, StaticPolicy):  # the preloaded experts are the static set
        state.policy = StaticPolicy(hot=state.resident(), frequency=frequency or {})
        cache.freeze_admitted = True  # first-use fill of free slots, then the static set never changes
    devices.synchronize()
    worker = CpuWorker(options.cpu_threads or default_cpu_threads())
    if costs is None:
        try:
            costs = profile_costs(options.cost_profile, store) if options.cost_profile \
                else calibrate_costs(store, devices, worker)
        except BaseException:  # e.g. a bad --cost-profile: no runtime, so nobody else would stop these
            worker.close()
            cache.release()
            raise
    fixed_costs = costs
    costs_for = lambda layer: fixed_costs  # noqa: E731  (every MoE layer has the same expert shape)
    pipeline = CopyPipeline(state, costs_for, list(config.moe_layers), options.prefetch_depth,
                            get_prefetcher(preset.prefetch), preset.fill_misses, budget.staging_slots)
    lookahead = Lookahead(model, options.prefetch_depth) if preset.prefetch != "none" else None
    runtime = HybridRuntime(model, preset, devices, cache, worker, costs_for, pipeline, lookahead)
    model.routing_observer = runtime.observe
    model.set_executor(runtime.executor)
    if routing is not None:
        install_replay(model, routing, runtime)
        runtime.replay = routing
    log.info("hybrid runtime: policy %s on %s, %s, cpu worker %d threads", preset.name, device,
             budget.describe(), worker.thread_count)
    return runtime
