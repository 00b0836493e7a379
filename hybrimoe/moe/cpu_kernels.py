"""Which CPU kernel computes the int4 weights (`--cpu-kernel torch|onnxruntime|ggml`): `apply_cpu_kernel`
switches a loaded model's experts, dense linears and decode graphs to it (hybrimoe.moe.ort_kernels,
hybrimoe.moe.ggml_kernels, hybrimoe.models.ort_decode / ggml_decode)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from hybrimoe.errors import ConfigError
from hybrimoe.moe.ort_kernels import _runtime, check_cpu_kernel, onnxruntime_available, release_free_heap

log = logging.getLogger(__name__)


def apply_cpu_kernel(model: Any, name: str, progress: bool = True, threads: int | None = None,
                     release_store: bool = False) -> None:
    """Switches `model`'s CPU int4 matmuls to kernel `name`: "torch" (the default: nothing to do),
    "onnxruntime" (the routed experts of an int4 store, `ExpertStore.use_cpu_kernel`, q/k/v projections
    stacked into one matmul where all three are int4, every other int4 `QuantLinear` on the CPU, and the
    decode graph) or "ggml" (the routed experts on llama.cpp's kernels, hybrimoe.moe.ggml_kernels; decode
    tokens as one ggml graph per layer when the dense weights are q4_0, hybrimoe.models.ggml_decode; q4_0
    linears on ggml, `QuantLinear.use_ggml`; other int4 linears as with "onnxruntime" when onnxruntime is
    installed, else torch's kernel). ConfigError when
    nothing the kernel computes is int4. `threads`: the kernels' thread pools (one per process, sized by the
    first call; default torch's thread count). `release_store`: free the store's bytes layer by layer as the
    kernel's copies are built (`ExpertStore.use_cpu_kernel(release=True)`: a CPU-only engine, where nothing
    copies experts to a GPU)."""
    if check_cpu_kernel(name) == "torch":
        return
    dense = name == "onnxruntime" or onnxruntime_available()  # the dense int4 linears go to onnxruntime
    if name == "ggml":
        from hybrimoe.moe.ggml_lib import ggml_runtime
        ggml_runtime(threads)
    if dense:  # the pools' size: the CPU worker's threads under the hybrid runtime, else torch's
        _runtime(threads, per_session=name == "ggml")
    store = model.expert_store
    switched = 0
    if store.format.name == "int4":
        store.use_cpu_kernel(name, progress, release=release_store)
        switched += 1
    if name == "ggml" and not switched:
        raise ConfigError("--cpu-kernel ggml computes int4 experts; these are "
                          f"{store.format.describe()} (add --expert-dtype q4_0, or int4)")
    stacked: set[int] = set()  # linears with a kernel of their own, or inside a stacked matmul (q/k/v)
    if name == "ggml":  # symmetric int4 linears (q4_0) on ggml's kernel
        for module in model.modules():
            if callable(getattr(module, "use_ggml", None)) and module.use_ggml():
                stacked.add(id(module))
                switched += 1
    if dense:  # the other int4 linears on onnxruntime's
        for module in model.modules():
            if callable(getattr(module, "stack_for_onnxruntime", None)) and id(module.q_proj) not in stacked:
                linears = module.stack_for_onnxruntime()
                stacked.update(map(id, linears))
                switched += bool(linears)
        for module in model.modules():
            if id(module) not in stacked and callable(getattr(module, "use_onnxruntime", None)):
                switched += bool(module.use_onnxruntime())
    elif name == "ggml":
        log.info("--cpu-kernel ggml: asymmetric int4 linears stay on torch's kernel (pip install onnxruntime onnx "
                 "puts them on onnxruntime's)")
    if not switched:
        raise ConfigError("--cpu-kernel onnxruntime computes int4 weights; this model has none on the CPU "
                          "(add --expert-dtype int4 and/or --dense-dtype int4)")
    if hasattr(model, "ort_decoder"):  # graphs per layer for decode tokens (None: the torch path)
        decoder = None
        if name == "ggml":  # the whole layer on ggml when the dense weights are q4_0
            from hybrimoe.models.ggml_decode import GgmlDecoder
            decoder = GgmlDecoder.build(model)
        if decoder is None and dense:
            from hybrimoe.models.ort_decode import OrtDecoder
            decoder = OrtDecoder.build(model)
        model.ort_decoder = decoder
    release_free_heap()


def leave_cores_to_onnxruntime() -> None:
    """A CPU-only engine on onnxruntime's kernels: torch drops to one thread beside onnxruntime's pool (sized
    before, from torch's count). torch's OpenMP team and onnxruntime's pool spin on the same cores; on the
    2-vCPU AMD EPYC, OMP_WAIT_POLICY unset, 1 GB benchmark model: decode without the decode graph 71 against
    23 ms per token, a 128-token prompt 1.33 against 0.69 s; under PASSIVE the prompt took the same time
    (benchmarks/RESULTS_formats.md). The heavy work runs in onnxruntime either way."""
    if torch.get_num_threads() > 1:
        log.info("torch: 1 thread beside the CPU kernel's own thread pool")
        torch.set_num_threads(1)
