"""Named policies: a scheduler for prefill, one for decode, a cache policy, a prefetcher, and how
the cache starts. The simulator and the runtime both take a `Preset` by name.

Every preset but the llama.cpp ones and resident starts with the same cache content: the most
frequently activated experts of a warm-up trace (dev traces of the model when available), filling
the budget (`initial_content`, used by the simulator and the runtime alike).
Then: "static" caches never change (copied experts run from a transient buffer); dynamic caches
admit copied experts (victim by their policy) and, with `fill_misses`, also copy experts that the
CPU computed on a miss into the cache in link idle time, if the policy values them above the victim.

How an executor (the simulator, or the GPU runtime) drives one MoE layer with a preset, through the
copy pipeline (hybrimoe.policy.pipeline) built from it:
    counts = {expert: tokens}; cache.policy.observe(layer, scores, experts, weights) per token
    view = pipeline.view(layer, counts, now)                       # landed / in flight / link free
    for e in counts: cache.access((layer, e))                      # hit / miss counters
    scheduler = preset.scheduler_role(tokens of this forward, is it a prompt's)   # "prefill" | "decode"
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
from hybrimoe.policy.cache_policy import hot_set
from hybrimoe.policy.plan import ExpertKey

# llama.cpp's CUDA backend computes an op whose weights live in host memory on the GPU (copying the
# weights over) when the op's batch has at least this many tokens: ggml/src/ggml-cuda/ggml-cuda.cu,
# ggml_backend_cuda_device_offload_op: `const int min_batch_size = 32; return get_op_batch_size(op)
# >= min_batch_size;` (MUL_MAT_ID: op->ne[2], the tokens of the ubatch), called by the scheduler in
# ggml/src/ggml-backend.cpp (ggml_backend_sched_backend_id_from_cur, "check if a backend with higher
# prio wants to offload the op") for weights in a host buffer; on by default (--no-op-offload).
LLAMACPP_OP_OFFLOAD_MIN_TOKENS = 32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    name: str
    prefill: str  # scheduler name for prefill forwards (> 1 token)
    decode: str  # scheduler name for decode steps (1 token per sequence; any batch: `scheduler_role`)
    cache: str  # cache policy name: mrs | lru | lfu | static
    prefetch: str  # impact | next-layer-score | none
    initial: str = "hot"  # hot (frequency hot set) | last-layers (llama.cpp --n-cpu-moe) | all (everything)
    fill_misses: bool = False  # copy CPU-computed misses into the cache in link idle time
    oracle: bool = False  # predictions are the true future routing, whatever accuracy is asked
    prefill_min_tokens: int = 2  # forwards of fewer tokens use the decode scheduler (llama.cpp: 32)
    cuda_graphs: bool = False  # decode forwards replay a CUDA graph: graph-captured launch overheads
    # the system picks its per-expert placement by the tokens an op carries in decode too (llama.cpp's
    # op offload, Fiddler's per-expert cost rule): a batched decode step of >= prefill_min_tokens
    # tokens is planned by `prefill`; else every decode step is planned by `decode`, whatever its batch
    decode_by_tokens: bool = False
    description: str = ""

    def uses_prefill_scheduler(self, tokens: int) -> bool:
        """Whether a forward of `tokens` tokens (batch 1) is planned by `prefill` (else `decode`)."""
        return tokens >= self.prefill_min_tokens

    def scheduler_role(self, tokens: int, prefill: bool) -> str:
        """"prefill" | "decode": which of the preset's schedulers plans a forward of `tokens` new tokens,
        a prompt's (`prefill`) or a decode step of `tokens` sequences, one token each. A prompt: by
        `uses_prefill_scheduler`; a decode step: `decode`, unless `decode_by_tokens` and the step
        carries at least `prefill_min_tokens` tokens (llama.cpp at batch >= 32). Batch 1 decode is
        always `decode`, as before."""
        if prefill or self.decode_by_tokens:
            return "prefill" if self.uses_prefill_scheduler(tokens) else "decode"
        return "decode"


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("hybrimoe", "hybrid", "hybrid", "mrs", "impact", fill_misses=True,
           description="HybriMoE: hybrid scheduling + MRS cache + impact-driven prefetch"),
    Preset("hybrimoe-sched-only", "hybrid", "hybrid", "static", "none",
           description="ablation: hybrid scheduling on the kTransformers static cache"),
    Preset("hybrimoe-prefetch-only", "gpu-only", "cpu-on-miss", "lru", "impact",
           description="ablation: kTransformers scheduling + impact prefetch (prefetched slots LRU)"),
    Preset("hybrimoe-cache-only", "gpu-only", "cpu-on-miss", "mrs", "none", fill_misses=True,
           description="ablation: kTransformers scheduling + MRS cache filled from misses"),
    Preset("ktransformers", "gpu-only", "cpu-on-miss", "static", "none", cuda_graphs=True,
           description="static hot set; decode misses on CPU, under CUDA graphs; prefill copies misses, "
                       "CPU idle"),
    Preset("llamacpp", "gpu-only", "static-layer", "static", "none", initial="last-layers",
           prefill_min_tokens=LLAMACPP_OP_OFFLOAD_MIN_TOKENS, decode_by_tokens=True,
           description="llama.cpp -ngl 99 --n-cpu-moe N: routed experts of the last layers that fit on "
                       "the GPU, of the first N layers on the CPU; forwards of >= 32 tokens copy a CPU "
                       "layer's experts to the GPU (op offload)"),
    Preset("llamacpp-no-op-offload", "static-layer", "static-layer", "static", "none", initial="last-layers",
           description="llama.cpp -ngl 99 --n-cpu-moe N --no-op-offload: CPU layers' experts always "
                       "computed on the CPU"),
    Preset("gpu-lru", "gpu-only", "gpu-only", "lru", "none",
           description="every miss copied to the GPU, LRU cache (AdapMoE-like without prefetch)"),
    Preset("fiddler", "fiddler-prefill", "cpu-on-miss", "static", "none", decode_by_tokens=True,
           description="static hot set; per-miss CPU vs copy+GPU choice by cost estimate"),
    Preset("resident", "hybrid", "hybrid", "static", "none", initial="all",
           description="every expert on the GPU (ignores the cache ratio), planned by the hybrid scheduler, "
                       "so the CPU still takes experts when that ends a layer sooner: no policy without "
                       "prefetch beats it at the same execution mode"),
    Preset("hybrimoe-oracle", "optimal", "optimal", "mrs", "impact", fill_misses=True, oracle=True,
           description="hybrimoe with the true future routing for prefetch and optimal per-layer plans "
                       "(<= 10 experts, else hybrid); a policy, not a limit: other schedules can beat it "
                       "(the limit is the fluid bound, hybrimoe.sim.bound)"),
]}
# old name -> new name; the old name still works and logs a warning
DEPRECATED = {"oracle": "hybrimoe-oracle"}


def llamacpp_placement(moe_layers: list[int], num_experts: int, slots: int) -> tuple[int, list[int]]:
    """(N, GPU layers) of llama.cpp's `-ngl 99 --n-cpu-moe N` sized to a cache of `slots` experts.

    `-ngl 99` puts every layer's dense part on the GPU; `--n-cpu-moe N` (common/arg.cpp) adds one
    tensor-buffer override per layer i < N, pattern `llm_ffn_exps_block_regex(i)` = "blk\\.i\\.ffn_
    (up|down|gate|gate_up)_(ch|)exps" (common/common.h), to the CPU buffer type: the routed experts
    of the FIRST N layers stay in host memory, those of the others go to the GPU, whole layers (one
    merged tensor per layer). The smallest N whose GPU-side experts fit: the last
    floor(slots / num_experts) MoE layers are on the GPU. N = the first GPU MoE layer's index
    (0 when every MoE layer fits); layer indices are the model's, dense layers included.
    """
    layers = sorted(moe_layers)
    fit = min(len(layers), max(0, slots) // num_experts)
    gpu = layers[len(layers) - fit:]
    n_cpu_moe = 0 if fit == len(layers) else (gpu[0] if gpu else layers[-1] + 1)
    return n_cpu_moe, gpu


def initial_content(preset: Preset, moe_layers: list[int], num_experts: int, slots: int,
                    frequency: dict[ExpertKey, float], layer_capacity: dict[int, int] | None = None
                    ) -> tuple[list[ExpertKey], int, dict[int, int] | None]:
    """(experts to preload, most valuable first; cache capacity in experts; per-layer budgets or None)
    for `preset` with a budget of `slots` experts (`layer_capacity`: per-layer budgets asked for);
    the simulator and the runtime both start from it.

    hot: the `slots` most frequent experts of `frequency` (per layer with `layer_capacity`);
    last-layers: llama.cpp's placement (`llamacpp_placement`), capacity = the whole layers it holds
    (the remainder of the budget stays unused, as in llama.cpp); per-layer budgets do not apply to
    whole layers, so the total of `layer_capacity` is its budget; all: every expert (the budget is
    ignored). `slots` is the budget already resolved from the cache ratio or bytes.
    """
    every = [(layer, e) for layer in sorted(moe_layers) for e in range(num_experts)]
    if preset.initial == "all":
        return every, len(every), layer_capacity
    if preset.initial == "last-layers":
        budget = slots if layer_capacity is None else min(slots, sum(layer_capacity.values()))
        _, gpu = llamacpp_placement(moe_layers, num_experts, budget)
        return [(layer, e) for layer in gpu for e in range(num_experts)], len(gpu) * num_experts, None
    if preset.initial == "hot":
        return hot_set(frequency, slots, layer_capacity), slots, layer_capacity
    raise ConfigError(f"preset {preset.name}: unknown initial cache content {preset.initial!r} "
                      "(hot | last-layers | all)")


def get_preset(name: str) -> Preset:
    if name in DEPRECATED:
        log.warning("policy %r is deprecated (it is not a limit: other schedules beat it); use %r",
                    name, DEPRECATED[name])
        name = DEPRECATED[name]
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(PRESETS)}") from None
