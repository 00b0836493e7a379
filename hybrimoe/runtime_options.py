"""Options of the hybrid runtime (issue 3): which placement policy, how big the expert cache, where.

One frozen dataclass, validated once at the edge (CLI flags or `Engine.from_pretrained(**kwargs)`);
everything downstream trusts it. Sizes are bytes, strings such as "12GB" are accepted at the edge:
  KB, MB, GB, TB  = powers of 1000;  KiB, MiB, GiB, TiB and bare K, M, G, T = powers of 1024.

Expert-cache size, at most one of:
  expert_cache_bytes   bytes of device memory for routed-expert slots (slots = bytes // expert bytes)
  cache_ratio          fraction of all routed experts of the model (0 .. 1)
If neither is given the preset's own ratio applies (e.g. `resident` = 1.0), else 0.25.
`gpu_memory_bytes` is an optional total device budget (dense part + expert cache); with no cache size
the cache gets what remains after the dense part. A budget that cannot hold the dense part is a
BudgetError, raised before any weight is loaded (see `hybrimoe.moe.budget.plan_budget`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from hybrimoe.errors import ConfigError

DEFAULT_CACHE_RATIO = 0.25
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: str | float, what: str = "size") -> int:
    """'12GB' -> 12_000_000_000, '1.5GiB' -> 1610612736, 4096 -> 4096. Bad input -> ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size in bytes such as 12GB or 512MiB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what} must be a size in bytes such as 12GB, 512MiB or 4096, got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    if number < 0:
        raise ConfigError(f"{what} must not be negative, got {value!r}")
    return int(number * _UNITS[unit])


def dummy_config_path(name: str) -> str:
    """--dummy-weights value -> a config.json path: a file, or a shipped shape name (hybrimoe/shapes)."""
    if os.path.isfile(name):
        return name
    from pathlib import Path
    shapes = Path(__file__).parent / "shapes"
    if (shapes / f"{name}.json").is_file():
        return str(shapes / f"{name}.json")
    known = sorted(p.stem for p in shapes.glob("*.json"))
    raise ConfigError(f"dummy_weights: {name!r} is neither a config.json file nor a shipped shape "
                      f"({', '.join(known)})")


def known_policies() -> list[str]:
    from hybrimoe.policy.presets import PRESETS
    return list(PRESETS)


@dataclass(frozen=True)
class RuntimeOptions:
    policy: str = "hybrimoe"  # preset name (hybrimoe.policy.presets)
    expert_cache_bytes: int | None = None  # bytes of expert slots on the compute device
    cache_ratio: float | None = None  # fraction of all routed experts that fit in the cache
    gpu_memory_bytes: int | None = None  # total device budget (dense + cache), optional
    per_layer_cache: bool = False  # False: one pool shared by all layers; True: slots // layers each
    cpu_threads: int | None = None  # torch threads of the CPU expert worker; None = cores - 1 (>= 1)
    device: str = "auto"  # compute device of cached experts; auto = where the model's dense weights are
    pin_memory: bool | None = None  # page-locked expert store; None = when the device is CUDA
    dummy_weights: str | None = None  # HF config.json (or shape name): random weights, no checkpoint
    replay_trace: str | None = None  # routing trace the routers follow instead of their gates
    cost_profile: str | None = None  # CostModel profile name or path for the scheduler; None = default
    seed: int = 0  # seed of dummy weights
    prefetch_depth: int = 3  # MoE layers ahead the prefetcher predicts (presets with prefetch only)
    staging_slots: int = 4  # device buffers (experts) for prefetches the cache does not keep (prefetch presets)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ConfigError(f"policy must be a preset name, got {self.policy!r}")
        if self.expert_cache_bytes is not None and self.cache_ratio is not None:
            raise ConfigError("give at most one of expert_cache_bytes (--expert-cache) and cache_ratio (--cache-ratio)")
        for name in ("expert_cache_bytes", "gpu_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a number of bytes >= 0, got {value!r}")
        if self.cache_ratio is not None and not (isinstance(self.cache_ratio, (int, float))
                                                 and 0.0 <= float(self.cache_ratio) <= 1.0):
            raise ConfigError(f"cache_ratio must be a fraction between 0 and 1, got {self.cache_ratio!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ConfigError(f"cpu_threads must be an integer >= 1, got {self.cpu_threads!r}")
        if not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 1:
            raise ConfigError(f"prefetch_depth must be an integer >= 1 layer, got {self.prefetch_depth!r}")
        if not isinstance(self.staging_slots, int) or self.staging_slots < 0:
            raise ConfigError(f"staging_slots must be an integer >= 0 experts, got {self.staging_slots!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.replay_trace is not None and not os.path.isfile(self.replay_trace):
            raise ConfigError(f"replay_trace: no such file: {self.replay_trace}")
        if self.dummy_weights is not None:
            dummy_config_path(self.dummy_weights)  # raises ConfigError when neither a file nor a shape

    @classmethod
    def from_kwargs(cls, **options: Any) -> RuntimeOptions:
        """Keyword options (sizes may be strings like '12GB'); unknown names -> ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown runtime option(s) {unknown}; known: {sorted(known)}")
        for name in ("expert_cache_bytes", "gpu_memory_bytes"):
            if options.get(name) is not None:
                options[name] = parse_bytes(options[name], name)
        return cls(**options).validated()

    def validated(self) -> RuntimeOptions:
        """Checks that need other modules: the policy name and the device's presence."""
        names = known_policies()
        if self.policy not in names:
            raise ConfigError(f"unknown policy {self.policy!r}; known: {', '.join(names)}")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} requested but CUDA is not available; use cpu or auto")
        return self

    def resolved_device(self, model_device: str | None = None) -> str:
        """'auto' -> the model's device when known, else 'cuda' when CUDA is available, else 'cpu'."""
        if self.device != "auto":
            return self.device
        if model_device is not None:
            return str(model_device)
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    def with_changes(self, **changes: Any) -> RuntimeOptions:
        return replace(self, **changes)
