"""ggml, llama.cpp's tensor library, through ctypes: the shared libraries that llama-cpp-python installs
(`llama_cpp/lib/libggml*.so`; or the directory in HYBRIMOE_GGML_LIB). Only the stable C API is used
(ggml.h, ggml-backend.h, ggml-alloc.h, ggml-cpu.h of ggml 0.9+): no struct layout but the two parameter
structs below, copied from ggml.h.

    ggml_library_dir() -> Path | None       where the libraries are (None: not installed)
    ggml_runtime(threads, poll) -> Ggml     the libraries, one CPU backend and its thread pool (per process)

The CPU backend's "CPU_REPACK" buffer type is where llama.cpp itself keeps Q4_0 weights: it reorders
them on upload into the interleaved layout of its AVX2/AVX-512 GEMV kernels (q4_0_8x8).
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from hybrimoe.errors import ConfigError

log = logging.getLogger(__name__)

GGML_F32, GGML_F16, GGML_Q4_0, GGML_I32 = 0, 1, 2, 26  # enum ggml_type
SORT_DESCENDING = 1  # enum ggml_sort_order
ROPE_NEOX = 2  # GGML_ROPE_TYPE_NEOX: rotate-half pairs (x[i], x[i + D/2])
DEVICE_CPU = 0  # enum ggml_backend_dev_type
BUFFER_USAGE_WEIGHTS = 1
DEFAULT_POLL = 50  # llama.cpp's default thread-pool polling level (0: sleep at once, 100: spin)
INSTALL_HINT = ("--cpu-kernel ggml needs llama.cpp's ggml libraries: pip install llama-cpp-python (builds from "
                "source, ~15 minutes on 2 cores), or set HYBRIMOE_GGML_LIB to a directory holding libggml*.so")
P = C.c_void_p


class InitParams(C.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", P), ("no_alloc", C.c_bool)]


class ThreadpoolParams(C.Structure):  # struct ggml_threadpool_params (GGML_MAX_N_THREADS = 512)
    _fields_ = [("cpumask", C.c_bool * 512), ("n_threads", C.c_int), ("prio", C.c_int), ("poll", C.c_uint32),
                ("strict_cpu", C.c_bool), ("paused", C.c_bool)]


_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {  # name -> (return type, argument types)
    "ggml_init": (P, (InitParams,)),
    "ggml_free": (None, (P,)),
    "ggml_tensor_overhead": (C.c_size_t, ()),
    "ggml_graph_overhead_custom": (C.c_size_t, (C.c_size_t, C.c_bool)),
    "ggml_new_tensor_1d": (P, (P, C.c_int, C.c_int64)),
    "ggml_new_tensor_2d": (P, (P, C.c_int, C.c_int64, C.c_int64)),
    "ggml_new_tensor_3d": (P, (P, C.c_int, C.c_int64, C.c_int64, C.c_int64)),
    "ggml_view_1d": (P, (P, P, C.c_int64, C.c_size_t)),
    "ggml_view_2d": (P, (P, P, C.c_int64, C.c_int64, C.c_size_t, C.c_size_t)),
    "ggml_view_3d": (P, (P, P, C.c_int64, C.c_int64, C.c_int64, C.c_size_t, C.c_size_t, C.c_size_t)),
    "ggml_reshape_2d": (P, (P, P, C.c_int64, C.c_int64)),
    "ggml_reshape_3d": (P, (P, P, C.c_int64, C.c_int64, C.c_int64)),
    "ggml_clamp": (P, (P, P, C.c_float, C.c_float)),
    "ggml_cpy": (P, (P, P, P)),
    "ggml_set_rows": (P, (P, P, P, P)),
    "ggml_flash_attn_ext": (P, (P, P, P, P, P, C.c_float, C.c_float, C.c_float)),
    "ggml_rope_ext": (P, (P, P, P, P, C.c_int, C.c_int, C.c_int, C.c_float, C.c_float, C.c_float, C.c_float,
                          C.c_float, C.c_float)),
    "ggml_nbytes": (C.c_size_t, (P,)),
    "ggml_get_data": (P, (P,)),
    "ggml_mul_mat": (P, (P, P, P)),
    "ggml_mul_mat_id": (P, (P, P, P, P)),
    "ggml_row_size": (C.c_size_t, (C.c_int, C.c_int64)),
    "ggml_swiglu": (P, (P, P)),
    "ggml_add": (P, (P, P, P)),
    "ggml_mul": (P, (P, P, P)),
    "ggml_rms_norm": (P, (P, P, C.c_float)),
    "ggml_soft_max": (P, (P, P)),
    "ggml_soft_max_ext": (P, (P, P, P, C.c_float, C.c_float)),
    "ggml_sigmoid": (P, (P, P)),
    "ggml_argsort": (P, (P, P, C.c_int)),
    "ggml_set_output": (None, (P,)),
    "ggml_gallocr_new": (P, (P,)),
    "ggml_gallocr_alloc_graph": (C.c_bool, (P, P)),
    "ggml_gallocr_get_buffer_size": (C.c_size_t, (P, C.c_int)),
    "ggml_gallocr_free": (None, (P,)),
    "ggml_argsort_top_k": (P, (P, P, C.c_int)),
    "ggml_get_rows": (P, (P, P, P)),
    "ggml_sum_rows": (P, (P, P)),
    "ggml_div": (P, (P, P, P)),
    "ggml_scale": (P, (P, P, C.c_float)),
    "ggml_new_graph_custom": (P, (P, C.c_size_t, C.c_bool)),
    "ggml_build_forward_expand": (None, (P, P)),
    "ggml_threadpool_params_default": (ThreadpoolParams, (C.c_int,)),
    "ggml_threadpool_new": (P, (C.POINTER(ThreadpoolParams),)),
    "ggml_backend_cpu_init": (P, ()),
    "ggml_backend_cpu_set_n_threads": (None, (P, C.c_int)),
    "ggml_backend_cpu_set_threadpool": (None, (P, P)),
    "ggml_backend_cpu_buffer_type": (P, ()),
    "ggml_backend_cpu_buffer_from_ptr": (P, (P, C.c_size_t)),
    "ggml_backend_dev_by_type": (P, (C.c_int,)),
    "ggml_backend_dev_backend_reg": (P, (P,)),
    "ggml_backend_reg_get_proc_address": (P, (P, C.c_char_p)),
    "ggml_backend_buft_name": (C.c_char_p, (P,)),
    "ggml_backend_buffer_free": (None, (P,)),
    "ggml_backend_buffer_set_usage": (None, (P, C.c_int)),
    "ggml_backend_alloc_ctx_tensors_from_buft": (P, (P, P)),
    "ggml_backend_alloc_ctx_tensors": (P, (P, P)),
    "ggml_backend_tensor_alloc": (C.c_int, (P, P, P)),
    "ggml_backend_view_init": (C.c_int, (P,)),
    "ggml_backend_tensor_set": (None, (P, P, C.c_size_t, C.c_size_t)),
    "ggml_backend_graph_compute": (C.c_int, (P, P)),
}


def ggml_library_dir() -> Path | None:
    """The directory of libggml-base.so / libggml-cpu.so: HYBRIMOE_GGML_LIB, else llama-cpp-python's."""
    env = os.environ.get("HYBRIMOE_GGML_LIB")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if (lib / "libggml-cpu.so").exists() else None


def ggml_available() -> bool:
    directory = ggml_library_dir()
    return directory is not None and (directory / "libggml-cpu.so").exists()


class Ggml:
    """The ggml functions of `_SIGNATURES` as attributes (`lib.ggml_mul_mat(...)`), one CPU backend with a
    thread pool of `threads` (`poll`: how long idle workers spin before sleeping, 0..100), the CPU_REPACK
    buffer type, and `lock`: the backend computes one graph at a time (held around each compute)."""

    def __init__(self, directory: Path, threads: int, poll: int) -> None:
        self.libs = [C.CDLL(str(directory / name), mode=C.RTLD_GLOBAL)
                     for name in ("libggml-base.so", "libggml-cpu.so", "libggml.so") if (directory / name).exists()]
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = self._find(name)
            fn.restype, fn.argtypes = restype, list(argtypes)
            setattr(self, name, fn)
        self.threads, self.poll = threads, poll
        self.backend = self.ggml_backend_cpu_init()
        self.ggml_backend_cpu_set_n_threads(self.backend, threads)
        params = self.ggml_threadpool_params_default(threads)
        params.poll = poll
        self.threadpool = self.ggml_threadpool_new(C.byref(params))
        self.ggml_backend_cpu_set_threadpool(self.backend, self.threadpool)
        self.cpu_buffer_type = self.ggml_backend_cpu_buffer_type()
        self.repack_buffer_type = self._extra_buffer_type(b"CPU_REPACK")
        self.lock = threading.Lock()

    def _find(self, name: str) -> Any:
        for lib in self.libs:
            try:
                return getattr(lib, name)
            except AttributeError:
                continue
        raise ConfigError(f"the ggml libraries in {ggml_library_dir()} have no {name} (too old a llama-cpp-python?)")

    def _extra_buffer_type(self, wanted: bytes) -> Any:
        """The CPU device's extra buffer type named `wanted`, or None (a build without it)."""
        device = self.ggml_backend_dev_by_type(DEVICE_CPU)
        address = self.ggml_backend_reg_get_proc_address(self.ggml_backend_dev_backend_reg(device),
                                                         b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return None
        extra = C.CFUNCTYPE(C.POINTER(P), P)(address)(device)  # NULL-terminated array
        i = 0
        while extra and extra[i]:
            if self.ggml_backend_buft_name(extra[i]) == wanted:
                return extra[i]
            i += 1
        return None

    def owner(self, obj: Any, contexts: list[Any], buffers: list[Any], allocators: list[Any] | None = None) -> None:
        """Frees `contexts`, `buffers` and graph `allocators` (lists the caller may still extend) when `obj` is
        garbage-collected."""
        weakref.finalize(obj, self.free, contexts, buffers, allocators)

    def free(self, contexts: list[Any], buffers: list[Any], allocators: list[Any] | None = None) -> None:
        for allocator in allocators or ():
            self.ggml_gallocr_free(allocator)
        if allocators:
            allocators.clear()
        for buffer in buffers:
            self.ggml_backend_buffer_free(buffer)
        for ctx in contexts:
            self.ggml_free(ctx)
        contexts.clear()
        buffers.clear()

    def array(self, tensor: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
        """A numpy view [shape] of `dtype` over an allocated ggml tensor's memory (read and written in place)."""
        import numpy as np

        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = np.ctypeslib.as_array(C.cast(self.ggml_get_data(tensor), C.POINTER(C.c_uint8)), (size,))
        return raw.view(dtype).reshape(shape)

    def allocate_graph(self, graph: Any, outputs: list[Any], allocators: list[Any]) -> None:
        """Memory for `graph`'s activations from one allocator (appended to `allocators`) that reuses a
        buffer once its last reader ran, as llama.cpp allocates its graphs; `outputs` keep theirs."""
        for tensor in outputs:
            self.ggml_set_output(tensor)
        allocator = self.ggml_gallocr_new(self.cpu_buffer_type)
        if not allocator:
            raise MemoryError("ggml could not make a graph allocator")
        allocators.append(allocator)
        if not self.ggml_gallocr_alloc_graph(allocator, graph):
            raise MemoryError("ggml could not allocate a graph's activations")

    def context(self, tensors: int, graph_nodes: int = 0) -> Any:
        """A ggml context holding the metadata of `tensors` tensors (and a graph of `graph_nodes`), no data."""
        size = tensors * self.ggml_tensor_overhead()
        if graph_nodes:
            size += self.ggml_graph_overhead_custom(graph_nodes, False)
        ctx = self.ggml_init(InitParams(size, None, True))
        if not ctx:
            raise MemoryError("ggml_init failed")
        return ctx


_STATE: dict[str, Ggml | None] = {"lib": None}
_LOCK = threading.Lock()


def ggml_runtime(threads: int | None = None, poll: int | None = None) -> Ggml:
    """The process's ggml (loaded at the first call, with `threads` threads, default torch's count; later
    calls get the same whatever they ask). ConfigError naming the fix when the libraries are missing."""
    import torch

    with _LOCK:
        if _STATE["lib"] is None:
            directory = ggml_library_dir()
            if directory is None or not (directory / "libggml-cpu.so").exists():
                raise ConfigError(INSTALL_HINT)
            poll = int(os.environ.get("HYBRIMOE_GGML_POLL", DEFAULT_POLL)) if poll is None else poll
            _STATE["lib"] = Ggml(directory, threads or torch.get_num_threads(), poll)
            log.info("ggml CPU kernels from %s: %d threads, poll %d", directory, _STATE["lib"].threads, poll)
        return _STATE["lib"]
