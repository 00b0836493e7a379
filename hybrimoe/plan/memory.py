"""Memory of one model on one machine, per expert format and policy, with the runtime's own accounting.

GPU (bytes), for a policy whose cache holds S experts of E_b bytes each:
    reserve                      CUDA context, allocator slack, activations (--gpu-reserve, default 1 GB)
  + KV cache                     at --context tokens: what the engine's KVCache allocates (GQA: 2 x kv heads x
                                 head dim per position and layer; MLA: latent + rope key; linear attention:
                                 its fixed state), in the model's dtype (GQA on the CPU: fp32, as the
                                 engine caches it for a half-precision model)
  + 2 transient expert buffers   GpuExpertCache's staging ring for copies the cache does not keep
  + dense part                   hybrimoe.moe.budget.dense_bytes (a meta-device model of the config)
  + staging slots x E_b          prefetching presets (--staging-slots, default 4)
  + S x E_b                      the expert cache
The last three are what the runtime's `--gpu-memory` counts (hybrimoe.moe.budget.plan_budget, called
here with the same options the recommended command gives), so the runtime is handed
--gpu-memory = GPU - reserve - KV - transient buffers, and S is what plan_budget makes of it.
Host (bytes): the expert store, every routed expert in its format in ONE allocation
(hybrimoe.moe.store.ExpertStore); on CUDA it is page-locked, and torch's caching host allocator rounds
a pinned request up to the next power of two (ATen/core/CachingHostAllocator.h, `PowerOf2Ceil`), so
that is what a pinned store takes. With `--cpu-kernel onnxruntime` or `ggml`, the kernel's copy of the int4
experts (`ORT_MEMORY_FACTOR` = 1.5x their bytes for onnxruntime, measured at group 32; `GGML_MEMORY_FACTOR`
= 0.9x for ggml's Q4_0) is host memory too: the runtime keeps the store for its copies. Families the runtime cannot load get the same sums with the dense
part estimated from the shape (attention, shared experts, dense MLPs, norms, embeddings, lm_head in the
model's dtype, routers fp32), labelled an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrimoe.errors import BudgetError
from hybrimoe.models.kv_cache import kv_cache_dtype
from hybrimoe.moe.budget import dense_bytes, plan_budget
from hybrimoe.moe.cache import STAGING_BUFFERS
from hybrimoe.moe.expert_layout import expert_nbytes
from hybrimoe.moe.install import staging_slots
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.moe.store import GGML_MEMORY_FACTOR, ORT_MEMORY_FACTOR
from hybrimoe.plan.target import Target
from hybrimoe.policy.presets import get_preset
from hybrimoe.runtime_options import RuntimeOptions

DEFAULT_GPU_RESERVE = 1_000_000_000  # B
TRANSIENT_EXPERTS = STAGING_BUFFERS  # GpuExpertCache's transient buffers (allocated at the first copy it does not keep)


def gb(n: float) -> str:
    """Bytes for people: GB (1e9) with one decimal, MB below 0.1 GB (tiny models, small shortfalls)."""
    return f"{n / 1e9:.1f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"


def pinned_bytes(n: int) -> int:
    """Bytes torch's caching host allocator page-locks for a request of n bytes: the next power of two."""
    return 1 << max(0, int(n) - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class Machine:
    gpu_bytes: int  # GPU memory (the whole card)
    host_bytes: int  # host RAM hybrimoe may use
    context: int  # tokens the KV cache holds (--max-context of the command)
    reserve_bytes: int = DEFAULT_GPU_RESERVE
    device: str = "cuda"  # where `serve` runs the dense part and the cache (cpu: the CPU fallback)
    dtype: str = "bf16"  # dense weights and activations
    cpu_kernel: str = "torch"  # the CPU side's int4 kernel (`--cpu-kernel`: onnxruntime/ggml add their copy)

    @property
    def pinned(self) -> bool:
        return self.device.startswith("cuda")  # serve pins the store on CUDA unless --no-pin-memory

    @property
    def torch_dtype(self) -> torch.dtype:
        from hybrimoe.loader import parse_dtype
        return parse_dtype(self.dtype)


@dataclass(frozen=True)
class FormatMemory:
    """What does not depend on the policy: dense part, KV cache, expert bytes, host store."""

    fmt: ExpertFormat
    dense_bytes: int
    kv_bytes: int
    expert_bytes: int
    total_experts: int
    host_bytes: int  # the expert store as allocated (pinned: rounded to a power of two)
    host_available: int
    estimated: bool  # dense part estimated from the shape (the runtime cannot load this family)
    pinned: bool = False  # the store is page-locked (CUDA, unless only a pageable store fits: --no-pin-memory)
    kernel_bytes: int = 0  # the CPU kernel's copy of the int4 experts (--cpu-kernel onnxruntime|ggml; the runtime
    #                     keeps the store for its copies, so both are host memory)

    @property
    def store_bytes(self) -> int:
        return self.total_experts * self.expert_bytes

    @property
    def transient_bytes(self) -> int:
        return TRANSIENT_EXPERTS * self.expert_bytes

    @property
    def host_fits(self) -> bool:
        return self.host_bytes + self.kernel_bytes <= self.host_available

    def runtime_gpu_memory(self, machine: Machine) -> int:
        """What the runtime's --gpu-memory may count: the GPU minus reserve, KV cache and transient buffers."""
        return machine.gpu_bytes - machine.reserve_bytes - self.kv_bytes - self.transient_bytes


@dataclass(frozen=True)
class DeviceBudget:
    """One policy's GPU budget in one format."""

    policy: str
    mem: FormatMemory
    slots: int  # experts the cache holds
    staging_slots: int
    fits: bool
    reason: str  # why not, with by how much ("" when it fits)
    reserve_bytes: int

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.mem.expert_bytes

    @property
    def ratio(self) -> float:
        return self.slots / self.mem.total_experts

    @property
    def runtime_bytes(self) -> int:
        """dense + staging + cache: what the runtime's --gpu-memory counts."""
        return self.mem.dense_bytes + (self.staging_slots + self.slots) * self.mem.expert_bytes

    @property
    def gpu_bytes(self) -> int:
        """Everything on the GPU: reserve + KV + transient buffers + dense + staging + cache."""
        return self.reserve_bytes + self.mem.kv_bytes + self.mem.transient_bytes + self.runtime_bytes


def kv_bytes(target: Target, context: int, dtype_bytes: int) -> int:
    """KV cache of `context` positions over every layer (hybrimoe.models.kv_cache sizes)."""
    shape = target.shape
    return int(sum(shape.kv_cache_bytes(layer, context, float(dtype_bytes)) for layer in range(shape.num_layers)))


def estimated_dense_bytes(target: Target, dtype_bytes: int) -> int:
    """Dense part from the shape alone (families the runtime cannot load): routers fp32, the rest dtype."""
    s = target.shape
    routers = s.hidden * s.num_experts * len(s.moe_layers)
    params = sum(s.attention_params(i) + s.dense_mlp_params(i) + 2 * s.hidden for i in range(s.num_layers))
    params += s.hidden + s.vocab_size * s.hidden * (1 if target.tied_embeddings else 2)
    return (params - routers) * dtype_bytes + routers * 4


def format_memory(target: Target, fmt: ExpertFormat, machine: Machine) -> FormatMemory:
    dtype = machine.torch_dtype
    shape = target.shape
    eb = expert_nbytes(fmt, shape.moe_intermediate, shape.hidden)
    total = shape.routed_expert_count
    dense = dense_bytes(target.config, dtype) if target.config is not None \
        else estimated_dense_bytes(target, dtype.itemsize)
    factor = {"onnxruntime": ORT_MEMORY_FACTOR, "ggml": GGML_MEMORY_FACTOR}.get(machine.cpu_kernel, 0.0)
    ort = int(factor * total * eb) if fmt.name == "int4" else 0
    # pinned when serve would pin, unless only the pageable store fits (then --no-pin-memory)
    pin = machine.pinned and pinned_bytes(total * eb) + ort <= machine.host_bytes
    host = pinned_bytes(total * eb) if pin else total * eb
    # the KV cache's dtype as the engine allocates it: GQA on the CPU keeps fp32 for a half-precision model
    kv_dtype = kv_cache_dtype(shape.attention.kind, dtype, machine.device)
    return FormatMemory(fmt, dense, kv_bytes(target, machine.context, kv_dtype.itemsize), eb, total, host,
                        machine.host_bytes, target.config is None, pin, ort)


def device_budget(target: Target, mem: FormatMemory, machine: Machine, policy: str,
                  slots: int | None = None, staging: int = 4) -> DeviceBudget:
    """The budget of `policy` (`slots`: a cache of that many experts; None: the largest that fits).
    Supported families: the slots come from hybrimoe.moe.budget.plan_budget with the options the
    recommended command gives."""
    preset = get_preset(policy)
    resident = preset.initial == "all"
    n_staging = staging_slots(preset, RuntimeOptions(staging_slots=staging))
    eb, total = mem.expert_bytes, mem.total_experts
    available = mem.runtime_gpu_memory(machine)
    want = total if resident else (0 if slots is None else min(slots, total))
    least = mem.dense_bytes + (n_staging + want) * eb  # the smallest runtime budget this row needs

    def refused(reason: str) -> DeviceBudget:
        return DeviceBudget(policy, mem, want, n_staging, False, reason, machine.reserve_bytes)

    if machine.cpu_kernel != "torch" and mem.fmt.name != "int4":
        return refused(f"--cpu-kernel {machine.cpu_kernel} computes int4 experts, not {mem.fmt.describe()}")
    if machine.cpu_kernel == "ggml" and not mem.fmt.symmetric:
        return refused(f"--cpu-kernel ggml computes q4_0 experts (symmetric int4), not {mem.fmt.describe()}")
    if not mem.host_fits:
        copy = "packed copy" if machine.cpu_kernel == "onnxruntime" else "copy"
        ort = f" + {machine.cpu_kernel}'s {copy} {gb(mem.kernel_bytes)}" if mem.kernel_bytes else ""
        return refused(f"host: the {mem.fmt.describe()} expert store takes {gb(mem.host_bytes)}"
                       f"{' pinned' if mem.pinned else ''}{ort}, "
                       f"{gb(mem.host_bytes + mem.kernel_bytes - mem.host_available)} more than {gb(mem.host_available)}")
    if available < least:
        what = "dense part + every expert" if resident else "dense part" + (" + staging" if n_staging else "")
        return refused(f"GPU: {what} + KV cache + 2 transient expert buffers + reserve need "
                       f"{gb(least + machine.gpu_bytes - available)}, {gb(least - available)} more than {gb(machine.gpu_bytes)}")
    if target.config is None:  # estimate: plan_budget's own rule
        got = want if (resident or slots is not None) else min(total, (available - least) // eb)
    else:
        options = RuntimeOptions(policy=policy, gpu_memory_bytes=available, staging_slots=staging,
                                 cache_ratio=1.0 if resident else None,
                                 expert_cache_bytes=None if resident or slots is None else want * eb)
        try:
            got = plan_budget(target.config, machine.torch_dtype, options, 1.0 if resident else None,
                              dense=mem.dense_bytes, staging_slots=n_staging, fmt=mem.fmt).slots
        except BudgetError as exc:  # the shortfall was checked above; keep the runtime's word if it differs
            return refused(f"GPU: {exc}")
    return DeviceBudget(policy, mem, got, n_staging, True, "", machine.reserve_bytes)
