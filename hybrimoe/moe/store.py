"""Host memory for routed expert weights: one contiguous buffer per expert.

Every MoE layer owns ONE preallocated tensor [E, numel]; expert e of that layer is row e, laid out by
its format (hybrimoe.moe.expert_layout): [gate (I*H) | up (I*H) | down (H*I)] for float formats, the
quantised bytes and scales for int8/int4. Moving an expert to the GPU is a single copy of that row.
Quantised stores are filled from float weights (quantised here, at load) or from already-quantised
matrices (`set_expert_quantized`, e.g. GGUF blocks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import BudgetError, ConfigError, HybrimoeError
from hybrimoe.moe.expert_layout import ExpertLayout
from hybrimoe.moe.kernels import ExpertView
from hybrimoe.moe.quant import ExpertFormat, Int4Matrix, Int8Matrix

log = logging.getLogger(__name__)
ORT_MEMORY_FACTOR = 1.5  # onnxruntime's packed copy / the int4 bytes (measured, benchmarks/RESULTS_formats.md)
GGML_MEMORY_FACTOR = 0.9  # ggml's Q4_0 blocks / a bf16 group-32 int4 store (18 / 20 bytes per 32 weights)


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


def drop_pages(tensor: torch.Tensor) -> None:
    """Returns the whole pages inside `tensor`'s memory to the OS (Linux madvise MADV_DONTNEED; a no-op
    elsewhere): the memory reads as zeros afterwards, so only for bytes nothing reads again."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


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
    """Routed experts of every MoE layer in host memory (pinned when `pin_memory`), in format `fmt`
    (default: float experts of `dtype`, the model's dtype)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 pin_memory: bool = False, fmt: ExpertFormat | None = None) -> None:
        self.config = config
        self.format = fmt if fmt is not None else ExpertFormat.parse(None, dtype)
        self.compute_dtype = self.format.compute_dtype  # activations (the model's dtype)
        self.dtype = self.format.storage_dtype  # element dtype of the buffers (uint8 for int8/int4)
        self.intermediate = config.moe_intermediate_size
        self.hidden = config.hidden_size
        self.layout = ExpertLayout(self.format, self.intermediate, self.hidden)
        self.expert_numel = self.layout.numel
        self._layers: dict[int, torch.Tensor] = {}   # layer -> [E, numel]
        self.cpu_kernel = "torch"  # or "onnxruntime" / "ggml" (`use_cpu_kernel`)
        self._released: set[int] = set()  # layers whose bytes were freed (the CPU kernel's copy is the only one)
        self._ort: dict[tuple[int, int], Any] = {}  # the CPU kernel's experts (`use_cpu_kernel`; kept across `pin`)
        self._layer_kernels: dict[int, Any] = {}  # layer -> its experts stacked (ggml: GgmlLayerExperts)
        self._pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # quantised: gate/up waiting for the other
        if torch.empty(0).device.type != "meta":  # a meta-device model (size estimates) allocates nothing
            check_host_memory(len(config.moe_layers) * config.num_experts * self.expert_nbytes,
                              f"the routed experts ({len(config.moe_layers)} layers x {config.num_experts}, "
                              f"{self.format.describe()})")
        self._bind(torch.empty(len(config.moe_layers) * config.num_experts * self.expert_numel, dtype=self.dtype,
                               pin_memory=pin_memory))

    def _bind(self, flat: torch.Tensor) -> None:
        """Every layer's [E, 3*I*H] tensor as a view of ONE allocation [L*E*3*I*H]. One allocation, not
        one per layer: torch's pinned-memory allocator rounds each request up to a power of two, which
        for per-layer tensors (e.g. 1.1 GB -> 2 GiB) nearly doubled the pinned memory of a store."""
        per_layer = self.config.num_experts * self.expert_numel
        self._views: dict[tuple[int, int], ExpertView] = {}  # (layer, expert) -> view of the current memory
        self._layers = {layer: flat[i * per_layer:(i + 1) * per_layer].view(self.config.num_experts, self.expert_numel)
                        for i, layer in enumerate(self.config.moe_layers)}

    def pin(self) -> None:
        """Moves the store into page-locked host memory (one allocation; no-op when already pinned).
        Take `buffer()` / `weights()` views after this: earlier views still point at the old memory."""
        if self._released or not self._layers or next(iter(self._layers.values())).is_pinned():
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
    def released(self) -> bool:
        """Every layer's bytes were freed (`release_host_copy`): the CPU kernel's copy is the only one."""
        return bool(self._layers) and self._released == set(self._layers)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert buffer."""
        return self.expert_numel * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._layers.values())

    def layer_tensor(self, layer: int) -> torch.Tensor:
        """The whole layer [E, numel] (e.g. to fill it in one go)."""
        return self._layers[layer]

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """Expert (layer, expert) as a contiguous 1-D tensor [numel] (a view, writes go to the store)."""
        if layer in self._released:
            raise HybrimoeError(f"the expert store's host copy of layer {layer} was released (--cpu-kernel "
                                "onnxruntime/ggml in a CPU-only run keeps that kernel's copy only); its bytes cannot be read")
        return self._layers[layer][expert]

    def weights(self, layer: int, expert: int) -> ExpertWeights:
        """gate/up/down views of a float-format expert (see `expert()` for every format)."""
        if self.format.quantized:
            raise TypeError(f"{self.format.name} experts have no float gate/up/down views; use expert()")
        return split_expert(self.buffer(layer, expert), self.intermediate, self.hidden)

    def expert(self, layer: int, expert: int) -> ExpertView:
        """The expert as a computable view (`.forward(x [T, H]) -> [T, H]`) of its host buffer (built once per
        expert and memory: ~15 us of tensor views per call otherwise, on every decode token); with
        `use_cpu_kernel`, that kernel's expert where it has one."""
        ort = self._ort.get((layer, expert))
        if ort is not None:
            return ort
        view = self._views.get((layer, expert))
        if view is None:
            view = self._views[(layer, expert)] = self.layout.view(self.buffer(layer, expert))
        return view

    def use_cpu_kernel(self, name: str, progress: bool = True, release: bool = False) -> int:
        """Computes the host experts with CPU kernel `name` from now on: "onnxruntime" (MatMulNBits,
        hybrimoe.moe.ort_kernels) or "ggml" (llama.cpp's Q4_0 kernels, hybrimoe.moe.ggml_kernels).
        Builds every expert's kernel copy here (with a progress bar); experts the kernel cannot compute
        (onnxruntime: GGUF Q4_K's non-integer zero points; ggml: any but symmetric int4) keep torch's kernel.
        Returns the int4 bytes handed over; the kernel's copy is extra host memory (onnxruntime: about 1.5x that
        at group 32, 1.2x at 128; ggml: 18 bytes per 32 weights), `release_host_copy` frees the store's own bytes where
        nothing else needs them. Int4 stores only; a second call changes nothing (models sharing one store each
        switch it). `release`: free each layer's bytes as soon as its copies exist (`release_layer`; a
        CPU-only engine), so that host memory peaks at the kernel's copy instead of the store plus that copy."""
        from tqdm import tqdm

        from hybrimoe.moe.ort_kernels import check_cpu_kernel, release_free_heap

        if self.cpu_kernel == name:
            return sum(e.nbytes for e in self._ort.values())
        if self.cpu_kernel != "torch":
            raise ConfigError(f"the expert store already computes on {self.cpu_kernel}, not {name}")
        check_cpu_kernel(name)
        if self.format.name != "int4":
            raise ConfigError(f"--cpu-kernel {name} computes int4 experts; these are {self.format.describe()} "
                              "(add --expert-dtype int4)")
        if name == "ggml":
            from hybrimoe.moe.ggml_kernels import GgmlExpert, GgmlLayerExperts
            builder: Any = GgmlExpert.build
            factor = GGML_MEMORY_FACTOR
        else:
            from hybrimoe.moe.ort_kernels import OrtExpert
            builder, factor = OrtExpert.build, ORT_MEMORY_FACTOR
        extra = factor - 1 if release else factor  # freed as built: the peak is the end
        check_host_memory(int(extra * self.nbytes), f"{name}'s copy of the int4 experts")
        experts = self.config.num_experts
        handed, kept = 0, 0
        for layer in tqdm(list(self._layers), desc=f"{name} experts", unit="layer", disable=not progress):
            stacked = None
            if name == "ggml":  # the layer's experts stacked for one-graph decode tokens where all are Q4_0
                stacked = GgmlLayerExperts.build([self.expert(layer, e) for e in range(experts)])
            if stacked is not None:
                self._layer_kernels[layer] = stacked
                self._ort.update({(layer, e): stacked.views[e] for e in range(experts)})
                handed += stacked.nbytes
            else:
                for e in range(experts):
                    built = builder(self.expert(layer, e))  # None: not computable there (torch's kernel)
                    if built is None:
                        kept += 1
                    else:
                        self._ort[(layer, e)] = built
                        handed += built.nbytes
            if release:
                self.release_layer(layer)
            release_free_heap()  # the build's temporaries (glibc keeps freed heap otherwise)
        if name == "ggml" and kept == len(self._layers) * experts:
            raise ConfigError("--cpu-kernel ggml computes symmetric int4 experts (Q4_0); these are asymmetric "
                              f"{self.format.describe()}: use --expert-dtype q4_0")
        self.cpu_kernel = name
        if kept:
            log.warning("%d of %d experts cannot run on %s (onnxruntime: GGUF Q4_K's non-integer zero points; "
                        "ggml: asymmetric int4, use --expert-dtype q4_0) and stay on torch's CPU kernel", kept,
                        len(self._layers) * experts, name)
        log.info("%s CPU kernel: %d experts, %.2f GB of int4 weights copied into its own memory (about %.2f GB "
                 "more host memory)", name, len(self._ort), handed / 1e9, factor * handed / 1e9)
        return handed

    def layer_kernel(self, layer: int) -> Any | None:
        """The CPU kernel's stacked experts of `layer` (`GgmlLayerExperts`: `.combine(x [1, H], ids, weights)`
        computes a decode token's routed experts in one call), or None."""
        return self._layer_kernels.get(layer)

    def release_host_copy(self) -> int:
        """Frees the store's own bytes of every layer whose experts all compute on the CPU kernel's copies (a
        CPU-only run with `--cpu-kernel onnxruntime|ggml`: nothing copies experts to a GPU, and that kernel's
        copy then is the only one; `release_layer`). Returns the bytes freed."""
        freed = sum(self.release_layer(layer) for layer in self.layers)
        if freed:
            log.info("expert store: released %.2f GB of its host copy (the CPU kernel's is the only one there)",
                     freed / 1e9)
        return freed

    def release_layer(self, layer: int) -> int:
        """Frees `layer`'s bytes if each of its experts has a CPU kernel copy (an onnxruntime session or a ggml
        expert; else, e.g. GGUF Q4_K experts on torch's kernel, nothing): onnxruntime's sessions then take every token count (no torch fallback
        above the crossover: measured 14% slower there, 99 against 87 ms at 512 tokens on one expert), and
        `buffer` raises for the layer. The pages go back to the OS at once (`madvise`), though the store is one
        allocation. Returns the bytes freed."""
        import dataclasses

        keys = [(layer, e) for e in range(self.config.num_experts)]
        if layer in self._released or not all(k in self._ort for k in keys):
            return 0
        tensor = self._layers[layer]
        freed = tensor.numel() * tensor.element_size()
        for key in keys:
            if hasattr(self._ort[key], "fallback"):  # onnxruntime's: its sessions now take every token count
                self._ort[key] = dataclasses.replace(self._ort[key], fallback=None)
            self._views.pop(key, None)
        if not tensor.is_pinned():
            drop_pages(tensor)
        self._layers[layer] = torch.empty(self.config.num_experts, 0, dtype=self.dtype)
        self._released.add(layer)
        return freed

    def view(self, buffer: torch.Tensor) -> ExpertView:
        """A computable view of an expert buffer [numel] anywhere (e.g. a GPU cache slot after a copy)."""
        return self.layout.view(buffer)

    def set_expert(self, layer: int, expert: int, *, gate: torch.Tensor | None = None,
                   up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> None:
        """Stores any of gate [I, H], up [I, H], down [H, I] (float, any dtype) into the expert's slice:
        cast for float formats; quantised for int8/int4 (gate and up together, once both arrived)."""
        if not self.format.quantized:
            w = self.weights(layer, expert)
            for dst, src in ((w.gate, gate), (w.up, up), (w.down, down)):
                if src is not None:
                    dst.copy_(src)
            return
        buffer = self.buffer(layer, expert)
        if down is not None:
            self.layout.write_matrix(buffer, 1, down)
        if gate is None and up is None:
            return
        pending = self._pending.setdefault((layer, expert), {})
        for name, t in (("gate", gate), ("up", up)):
            if t is not None:
                pending[name] = t.detach().to(torch.float32, copy=True)
        if len(pending) == 2:
            del self._pending[(layer, expert)]
            self.layout.write_matrix(buffer, 0, torch.cat((pending["gate"], pending["up"])))

    def set_gate_up(self, layer: int, expert: int, gate_up: torch.Tensor) -> None:
        """gate_up [2I, H] (rows 0..I-1 gate, then up) in one go (fused checkpoints)."""
        if not self.format.quantized:
            self.buffer(layer, expert)[:2 * self.intermediate * self.hidden].copy_(gate_up.reshape(-1))
        else:
            self.layout.write_matrix(self.buffer(layer, expert), 0, gate_up)

    def set_expert_quantized(self, layer: int, expert: int, gate_up: Int8Matrix | Int4Matrix,
                             down: Int8Matrix | Int4Matrix) -> None:
        """Stores already-quantised matrices (gate_up [2I, H], down [H, I]) of the store's kind without
        re-rounding the codes (int4 of a coarser group than the store's is re-quantised; see docs/CONTRACTS.md)."""
        if not self.format.quantized:
            raise TypeError(f"a {self.format.name} store takes float weights; use set_expert")
        buffer = self.buffer(layer, expert)
        self.layout.write_matrix(buffer, 0, gate_up)
        self.layout.write_matrix(buffer, 1, down)

    def check_complete(self) -> None:
        """Every quantised expert got both gate and up (a loader calls this at the end)."""
        if self._pending:
            (layer, e), parts = next(iter(self._pending.items()))
            from hybrimoe.errors import CheckpointError
            raise CheckpointError(f"routed expert {e} of layer {layer} got only {sorted(parts)} of gate and up")

    def fill_random(self, generator: torch.Generator, std: float) -> None:
        """Normal(0, std) weights for every expert (checkpoint-less benchmarks), quantised if the format says."""
        i, h = self.intermediate, self.hidden
        for layer, t in self._layers.items():
            if not self.format.quantized:
                for row in t:   # one expert at a time keeps the fp32 temporary small
                    row.copy_(torch.randn(row.shape, generator=generator) * std)
                continue
            for e in range(t.shape[0]):
                self.set_gate_up(layer, e, torch.randn(2 * i, h, generator=generator) * std)
                self.set_expert(layer, e, down=torch.randn(h, i, generator=generator) * std)
