"""Host memory for routed expert weights: one contiguous buffer per expert.

Every MoE layer owns ONE preallocated tensor [E, 3*I*H]; expert e of that layer is row e, laid out
[gate (I*H) | up (I*H) | down (H*I)], so moving an expert to the GPU is a single copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import BudgetError


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where the OS does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(needed: int, what: str) -> None:
    """BudgetError before allocating `needed` bytes of host memory that the machine does not have."""
    available = host_available_bytes()
    if available is not None and needed > available:
        raise BudgetError(f"{what} need {needed / 1e9:.2f} GB of host memory, but only {available / 1e9:.2f} GB "
                          "is available; use a smaller --dtype, free memory, or a machine with more RAM")


@dataclass(frozen=True)
class ExpertWeights:
    """Views into one expert's buffer: f(x) = down @ (silu(gate @ x) * (up @ x))."""
    gate: torch.Tensor   # [I, H]
    up: torch.Tensor     # [I, H]
    down: torch.Tensor   # [H, I]


def split_expert(buffer: torch.Tensor, intermediate: int, hidden: int) -> ExpertWeights:
    """Views of a 1-D buffer [3*I*H] (on any device) as gate/up/down matrices."""
    n = intermediate * hidden
    return ExpertWeights(gate=buffer[:n].view(intermediate, hidden),
                         up=buffer[n:2 * n].view(intermediate, hidden),
                         down=buffer[2 * n:].view(hidden, intermediate))


class ExpertStore:
    """Routed experts of every MoE layer in host memory (pinned when `pin_memory`)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 pin_memory: bool = False) -> None:
        self.config = config
        self.dtype = dtype
        self.intermediate = config.moe_intermediate_size
        self.hidden = config.hidden_size
        self.expert_numel = 3 * self.intermediate * self.hidden
        self._layers: dict[int, torch.Tensor] = {}   # layer -> [E, 3*I*H]
        if torch.empty(0).device.type != "meta":  # a meta-device model (size estimates) allocates nothing
            check_host_memory(len(config.moe_layers) * config.num_experts * self.expert_numel * dtype.itemsize,
                              f"the routed experts ({len(config.moe_layers)} layers x {config.num_experts})")
        self._bind(torch.empty(len(config.moe_layers) * config.num_experts * self.expert_numel, dtype=dtype,
                               pin_memory=pin_memory))

    def _bind(self, flat: torch.Tensor) -> None:
        """Every layer's [E, 3*I*H] tensor as a view of ONE allocation [L*E*3*I*H]. One allocation, not
        one per layer: torch's pinned-memory allocator rounds each request up to a power of two, which
        for per-layer tensors (e.g. 1.1 GB -> 2 GiB) nearly doubled the pinned memory of a store."""
        per_layer = self.config.num_experts * self.expert_numel
        self._layers = {layer: flat[i * per_layer:(i + 1) * per_layer].view(self.config.num_experts, self.expert_numel)
                        for i, layer in enumerate(self.config.moe_layers)}

    def pin(self) -> None:
        """Moves the store into page-locked host memory (one allocation; no-op when already pinned).
        Take `buffer()` / `weights()` views after this: earlier views still point at the old memory."""
        if not self._layers or next(iter(self._layers.values())).is_pinned():
            return
        flat = torch.empty(sum(t.numel() for t in self._layers.values()), dtype=self.dtype, pin_memory=True)
        old = self._layers
        self._bind(flat)
        for layer, tensor in old.items():
            self._layers[layer].copy_(tensor)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self._layers)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert buffer."""
        return self.expert_numel * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._layers.values())

    def layer_tensor(self, layer: int) -> torch.Tensor:
        """The whole layer [E, 3*I*H] (e.g. to fill it in one go)."""
        return self._layers[layer]

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """Expert (layer, expert) as a contiguous 1-D tensor [3*I*H] (a view, writes go to the store)."""
        return self._layers[layer][expert]

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        return split_expert(self.buffer(layer, expert), self.intermediate, self.hidden)

    def set_expert(self, layer: int, expert: int, *, gate: torch.Tensor | None = None,
                   up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> None:
        """Copies any of gate [I, H], up [I, H], down [H, I] into the expert's slice (casting dtype)."""
        w = self.weights(layer, expert)
        for dst, src in ((w.gate, gate), (w.up, up), (w.down, down)):
            if src is not None:
                dst.copy_(src)

    def fill_random(self, generator: torch.Generator, std: float) -> None:
        """Normal(0, std) weights for every expert (checkpoint-less benchmarks)."""
        for t in self._layers.values():
            for row in t:   # one expert at a time keeps the fp32 temporary small
                row.copy_(torch.randn(row.shape, generator=generator) * std)
