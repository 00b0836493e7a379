"""`CostModel`: seconds for each unit of MoE work, from a measured or derived hardware profile.

Pure Python (no torch). A profile is JSON in hybrimoe/profiles/ (or anywhere, by path): every
parameter is {"value": number, "unit": str, "_derivation": str}, so each number says where it came
from. `hybrimoe calibrate` writes profiles for the machine at hand in the same format.

Every time is a roofline: max(bytes moved / bandwidth, FLOPs / FLOP rate) + a fixed overhead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hybrimoe.errors import ConfigError
from hybrimoe.jsonfile import read_json_object
from hybrimoe.policy.shape import ExpertShape, ModelShape

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# parameter -> unit; every profile gives each of them.
PARAMETERS: dict[str, str] = {
    "cpu_bits": "bit/param",  # routed experts in host memory, as the CPU kernel reads them
    "gpu_bits": "bit/param",  # routed experts in the GPU cache (and what a copy moves)
    "dense_bits": "bit/param",  # GPU-resident dense weights: attention, shared experts, router, lm_head
    "cpu_stream_bandwidth": "B/s",  # achieved host-memory read rate of the CPU expert kernel
    "cpu_flops": "FLOP/s",  # achieved CPU expert-matmul rate
    "cpu_expert_overhead": "s",  # fixed cost per CPU expert (dispatch, sync, activation traffic)
    "cpu_first_expert_penalty": "x",  # factor on the first CPU expert of a layer (>= 1)
    "gpu_hbm_bandwidth": "B/s",  # achieved device-memory read rate
    "gpu_flops": "FLOP/s",  # achieved expert-GEMM rate (quantised kernel)
    "gpu_dense_flops": "FLOP/s",  # achieved rate of the dense layers' GEMMs
    "gpu_kernel_overhead": "s",  # fixed cost per GPU expert (kernel launches)
    "gpu_layer_overhead": "s",  # fixed cost of one layer's dense part (its kernel launches)
    "pcie_bandwidth": "B/s",  # achieved pinned host -> device copy rate
    "pcie_latency": "s",  # fixed cost per copy
}
# Optional parameters: the launch overheads when a forward replays a captured CUDA graph (no Python
# dispatch, no per-kernel host launch). A profile without them (e.g. one `hybrimoe calibrate` wrote:
# our runtime is eager, so it measures eager launches) prices graph replays at 0 launch overhead,
# the most favourable case for a baseline that uses graphs.
GRAPH_PARAMETERS: dict[str, str] = {
    "gpu_graph_kernel_overhead": "s",  # fixed cost per GPU expert inside a replayed CUDA graph
    "gpu_graph_layer_overhead": "s",  # fixed cost of one layer's dense part inside a replayed CUDA graph
}


# Expert formats (hybrimoe.moe.quant): the CPU expert kernel per format and token count. Up to this many
# tokens torch's fused weight-only kernel (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu) runs;
# above it the expert is dequantised to the compute dtype and a dense GEMM runs (a fixed dequantisation
# cost, then a time that grows slower with the token count than the fused kernels' does). Crossovers
# measured with benchmarks/bench_expert_kernels.py on an AMD EPYC (Zen 4, AVX-512), 2 threads, bf16
# (benchmarks/RESULTS_formats.md): int8 fused wins at 8 tokens and loses at 32 on both Mixtral and
# DeepSeek-V2-Lite experts; int4 fused wins up to 128 tokens on both and loses at 512 (DeepSeek-V2-Lite).
# onnxruntime's MatMulNBits (int8 activations, `--cpu-kernel onnxruntime`): faster than torch's int4 kernel
# up to 128 tokens on a Mixtral-shaped expert (H 2048, I 4096), slower at 512: the same 256.
CPU_FUSED_KERNEL_MAX_TOKENS: dict[str, int] = {"int8": 16, "int4": 256, "onnxruntime": 256}
FORMAT_BASE_BITS: dict[str, float] = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "int8": 8.0, "int4": 4.0}
FORMAT_NAMES = (*FORMAT_BASE_BITS, "q4_0")  # `--expert-dtype` values (hybrimoe.moe.quant; here without torch)


def format_bits(name: str, hidden: int, intermediate: int, group: int = 32, scale_bits: float = 16.0) -> float:
    """Bits per expert weight in format `name`, scales included (section padding ignored):
    int8 keeps one scale per output row (2I + H rows over 3*I*H weights), int4 a scale and a zero per
    `group` inputs (2 * scale_bits / group). Unknown name -> ConfigError."""
    if name not in FORMAT_BASE_BITS:
        raise ConfigError(f"unknown expert format {name!r}; known: {', '.join(FORMAT_BASE_BITS)}")
    bits = FORMAT_BASE_BITS[name]
    if name == "int8":
        bits += scale_bits * (2 * intermediate + hidden) / (3.0 * intermediate * hidden)
    elif name == "int4":
        bits += 2.0 * scale_bits / group
    return bits


@dataclass(frozen=True)
class CostModel:
    name: str
    cpu_bits: float
    gpu_bits: float
    dense_bits: float
    cpu_stream_bandwidth: float
    cpu_flops: float
    cpu_expert_overhead: float
    cpu_first_expert_penalty: float
    gpu_hbm_bandwidth: float
    gpu_flops: float
    gpu_dense_flops: float
    gpu_kernel_overhead: float
    gpu_layer_overhead: float
    pcie_bandwidth: float
    pcie_latency: float
    gpu_graph_kernel_overhead: float = 0.0
    gpu_graph_layer_overhead: float = 0.0
    description: str = ""
    derivations: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # e.g. calibration samples

    def __post_init__(self) -> None:
        for name in (*PARAMETERS, *GRAPH_PARAMETERS):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ConfigError(f"profile {self.name!r}: {name} = {value!r} must be a number >= 0")
            if name not in ("cpu_expert_overhead", "gpu_kernel_overhead", "gpu_layer_overhead", "pcie_latency",
                            *GRAPH_PARAMETERS) and value == 0:
                raise ConfigError(f"profile {self.name!r}: {name} must be > 0")
        if self.cpu_first_expert_penalty < 1.0:
            raise ConfigError(f"profile {self.name!r}: cpu_first_expert_penalty {self.cpu_first_expert_penalty} < 1")

    # ------------------------------------------------------------------ variants
    def with_cuda_graphs(self) -> "CostModel":
        """The same machine when forwards replay a captured CUDA graph: gpu_kernel_overhead and
        gpu_layer_overhead become gpu_graph_kernel_overhead and gpu_graph_layer_overhead."""
        return dataclasses.replace(self, name=f"{self.name}+cuda-graphs",
                                   gpu_kernel_overhead=self.gpu_graph_kernel_overhead,
                                   gpu_layer_overhead=self.gpu_graph_layer_overhead)

    def with_cpu_rate_scale(self, scale: float) -> "CostModel":
        """The same machine with a CPU `scale` times slower: cpu_stream_bandwidth and cpu_flops divided
        by `scale`, cpu_expert_overhead multiplied by it, so every CPU expert time is `scale` x."""
        if not scale > 0:
            raise ConfigError(f"CPU rate scale must be > 0, got {scale}")
        if scale == 1.0:
            return self
        return dataclasses.replace(self, name=f"{self.name}, CPU rate /{scale:g}",
                                   cpu_stream_bandwidth=self.cpu_stream_bandwidth / scale,
                                   cpu_flops=self.cpu_flops / scale,
                                   cpu_expert_overhead=self.cpu_expert_overhead * scale)

    # ------------------------------------------------------------------ experts
    def cpu_expert_shape(self, model: ModelShape) -> ExpertShape:
        return model.expert_shape(self.cpu_bits)

    def gpu_expert_shape(self, model: ModelShape) -> ExpertShape:
        return model.expert_shape(self.gpu_bits)

    def cpu_expert_time(self, shape: ExpertShape, tokens: int, first: bool = False) -> float:
        """Seconds for the CPU to run one expert over `tokens` tokens from host memory.

        (max(bytes [B] / cpu_stream_bandwidth [B/s], flops [FLOP] / cpu_flops [FLOP/s])
         + cpu_expert_overhead [s]) * (cpu_first_expert_penalty if first else 1).
        Zero tokens: the expert is not run, 0 s.
        """
        assert tokens >= 0, tokens
        if tokens == 0:
            return 0.0
        seconds = max(shape.bytes / self.cpu_stream_bandwidth, shape.flops(tokens) / self.cpu_flops)
        seconds += self.cpu_expert_overhead
        return seconds * (self.cpu_first_expert_penalty if first else 1.0)

    def gpu_expert_time(self, shape: ExpertShape, tokens: int) -> float:
        """Seconds for the GPU to run one resident expert over `tokens` tokens:
        max(bytes [B] / gpu_hbm_bandwidth [B/s], flops [FLOP] / gpu_flops [FLOP/s]) + gpu_kernel_overhead [s]."""
        assert tokens >= 0, tokens
        if tokens == 0:
            return 0.0
        return max(shape.bytes / self.gpu_hbm_bandwidth, shape.flops(tokens) / self.gpu_flops) + self.gpu_kernel_overhead

    def copy_time(self, shape: ExpertShape) -> float:
        """Seconds to copy one expert host -> GPU: bytes [B] / pcie_bandwidth [B/s] + pcie_latency [s].
        Independent of the token count."""
        return shape.bytes / self.pcie_bandwidth + self.pcie_latency

    def expert_costs(self, model: ModelShape) -> "ExpertCostTable":
        """The `ExpertCosts` (hybrimoe.policy.plan) of one of `model`'s MoE layers under this profile."""
        return ExpertCostTable(self, self.cpu_expert_shape(model), self.gpu_expert_shape(model))

    # ------------------------------------------------------------------ dense parts (on the GPU)
    def gpu_dense_time(self, model: ModelShape, layer: int, tokens: int, context: int) -> float:
        """Seconds for the GPU part of `layer` besides routed experts, for `tokens` new tokens after
        `context` cached ones: attention projections, attention over the context, norms, router and
        shared experts (or the dense MLP of a dense layer).

        weight bytes [B] = (attention + MLP/shared/router params) * dense_bits / 8
        state bytes [B]  = KV cache (or recurrent state) read, bf16
        flops [FLOP]     = 2 * params * tokens + attention core FLOPs
        time [s] = max((weight + state bytes) / gpu_hbm_bandwidth, flops / gpu_dense_flops) + gpu_layer_overhead
        """
        assert tokens >= 1 and context >= 0, (tokens, context)
        params = model.attention_params(layer) + model.dense_mlp_params(layer) + 2 * model.hidden  # + 2 RMSNorms
        weight_bytes = params * self.dense_bits / 8.0
        state_bytes = model.kv_cache_bytes(layer, context + tokens)
        flops = 2.0 * params * tokens + model.attention_core_flops(layer, tokens, context)
        return max((weight_bytes + state_bytes) / self.gpu_hbm_bandwidth, flops / self.gpu_dense_flops) + self.gpu_layer_overhead

    def gpu_dense_time_batch(self, model: ModelShape, layer: int, contexts: Sequence[int]) -> float:
        """Seconds of the same GPU part for one decode step of len(contexts) sequences, one new token
        each after contexts[i] cached ones (continuous batching): the weights are read once, each
        sequence's attention state and attention core are its own.

        state bytes [B] = sum_i KV cache of contexts[i] + 1 positions; flops [FLOP] = 2 * params * B +
        sum_i attention core of 1 token after contexts[i]; time as `gpu_dense_time`. One sequence
        gives exactly `gpu_dense_time(model, layer, 1, contexts[0])`."""
        assert len(contexts) >= 1 and min(contexts) >= 0, contexts
        params = model.attention_params(layer) + model.dense_mlp_params(layer) + 2 * model.hidden  # + 2 RMSNorms
        weight_bytes = params * self.dense_bits / 8.0
        state_bytes = sum(model.kv_cache_bytes(layer, c + 1) for c in contexts)
        flops = 2.0 * params * len(contexts) + sum(model.attention_core_flops(layer, 1, c) for c in contexts)
        return max((weight_bytes + state_bytes) / self.gpu_hbm_bandwidth, flops / self.gpu_dense_flops) + self.gpu_layer_overhead

    def lm_head_time(self, model: ModelShape, tokens: int) -> float:
        """Seconds for the final norm and the output projection over `tokens` tokens (prefill needs
        only the last one): max(H*V*dense_bits/8 [B] / gpu_hbm_bandwidth, 2*H*V*tokens [FLOP] /
        gpu_dense_flops) + gpu_layer_overhead [s]."""
        assert tokens >= 1, tokens
        params = model.hidden * model.vocab_size
        return max(params * self.dense_bits / 8.0 / self.gpu_hbm_bandwidth,
                   2.0 * params * tokens / self.gpu_dense_flops) + self.gpu_layer_overhead

    # ------------------------------------------------------------------ files
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "profile") -> "CostModel":
        if not isinstance(d, dict) or not isinstance(d.get("params"), dict):
            raise ConfigError(f"{where}: expected an object with 'name' and 'params'")
        params = d["params"]
        missing = [p for p in PARAMETERS if p not in params]
        unknown = [p for p in params if p not in PARAMETERS and p not in GRAPH_PARAMETERS]
        if missing or unknown:
            raise ConfigError(f"{where}: missing parameters {missing}, unknown {unknown}; "
                              f"a profile gives exactly: {', '.join(PARAMETERS)} "
                              f"(and optionally {', '.join(GRAPH_PARAMETERS)})")
        values, derivations = {}, {}
        for name, entry in params.items():
            if not isinstance(entry, dict) or "value" not in entry:
                raise ConfigError(f"{where}: {name} must be {{\"value\": ..., \"unit\": ..., \"_derivation\": ...}}")
            values[name] = entry["value"]
            derivations[name] = str(entry.get("_derivation", ""))
        extra = {k: v for k, v in d.items() if k not in ("name", "description", "params")}
        return cls(name=str(d.get("name", where)), description=str(d.get("description", "")),
                   derivations=derivations, extra=extra, **values)

    def to_dict(self) -> dict[str, Any]:
        params = {name: {"value": getattr(self, name), "unit": unit, "_derivation": self.derivations.get(name, "")}
                  for name, unit in PARAMETERS.items()}
        params.update({name: {"value": getattr(self, name), "unit": unit, "_derivation": self.derivations[name]}
                       for name, unit in GRAPH_PARAMETERS.items() if name in self.derivations})
        return {"name": self.name, "description": self.description, "params": params, **self.extra}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "CostModel":
        """A shipped profile by name (see `known_profiles()`), or a profile JSON file by path."""
        text = str(name_or_path)
        path = PROFILES_DIR / f"{text}.json"
        if not path.is_file():
            path = Path(text)
            if not (path.suffix == ".json" or os.path.sep in text) or not path.is_file():
                hint = f"profile file {text} not found; " if path.suffix == ".json" or os.path.sep in text else ""
                raise ConfigError(f"{hint}unknown cost profile {text!r}; shipped: {', '.join(known_profiles())} "
                                  "(or a path to a profile JSON written by `hybrimoe calibrate`)")
        return cls.from_dict(read_json_object(path, "cost profile"), str(path))


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


@dataclass(frozen=True)
class ExpertCostTable:
    """`ExpertCosts` of one MoE layer: cpu(tokens, first), gpu(tokens), copy(), all in seconds."""

    model: CostModel
    cpu_shape: ExpertShape
    gpu_shape: ExpertShape

    def cpu(self, tokens: int, first: bool) -> float:
        return self.model.cpu_expert_time(self.cpu_shape, tokens, first)

    def gpu(self, tokens: int) -> float:
        return self.model.gpu_expert_time(self.gpu_shape, tokens)

    def copy(self) -> float:
        return self.model.copy_time(self.gpu_shape)


__all__ = ["CPU_FUSED_KERNEL_MAX_TOKENS", "CostModel", "format_bits", "ExpertCostTable", "ExpertShape",
           "GRAPH_PARAMETERS", "ModelShape", "PARAMETERS", "known_profiles"]
