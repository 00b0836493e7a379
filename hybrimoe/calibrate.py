"""Measure this machine's expert costs with torch and fit a `CostModel` profile to them.

What is measured (times in seconds, sizes in bytes):
- CPU: one SwiGLU expert, down @ (silu(gate @ x) * (up @ x)), from its own contiguous host buffer
  in the engine's layout and format (`expert_dtype`: bf16, int8, int4 quantised as the store does;
  computed with the engine's kernels, hybrimoe.moe.kernels) for 1, 2, 4, ... tokens. A "layer" runs several experts
  back to back after a pause that touches an eviction buffer (standing in for attention): the first
  expert of each layer is timed apart from the later ones.
- GPU (when CUDA is present): the same expert resident in device memory (its stored bytes), timed
  with CUDA events; pinned host -> device copies of the format's expert bytes on a side stream; a dense GEMM; kernel launch cost.
  Without CUDA the GPU entries are measured on the CPU (warm experts, host-to-host copies) and their
  derivations say "measured on cpu", so the profile format stays the same.
Fits (least squares, see hybrimoe.policy.cost.fit_*): t(n) = max(a, b*n) + c gives bandwidth = bytes/a,
(on the CPU, a half-width expert's single-token time splits a from c: fit_roofline_two_sizes),
FLOP rate = flops-per-token/b, overhead = c; the first-expert penalty is the least-squares ratio of
first-expert times to the fitted later-expert times; copies fit t = latency + bytes/bandwidth.
`fit_profile` does the fitting alone (the tests feed it synthetic samples of known rates).
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hybrimoe.errors import ConfigError
from hybrimoe.moe.expert_layout import ExpertLayout, expert_nbytes
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.policy.cost import CPU_FUSED_KERNEL_MAX_TOKENS, PARAMETERS, CostModel
from hybrimoe.policy.fit import fit_affine, fit_penalty, fit_roofline, fit_roofline_two_sizes
from hybrimoe.policy.shape import ExpertShape

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BITS = {"bf16": 16.0, "fp16": 16.0, "fp32": 32.0}


@dataclass(frozen=True)
class CalibrationSettings:
    hidden: int  # H of the expert to measure
    intermediate: int  # I
    dtype: str = "bf16"
    token_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    layers: int = 5  # measured "layers" per token count (each gives one first-expert sample)
    experts_per_layer: int = 4
    evict_bytes: int = 64 << 20  # touched between layers to cool the caches (B)
    pause_s: float = 0.002  # idle time between layers, letting worker threads sleep (s)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    expert_dtype: str | None = None  # expert format (bf16 | int8 | int4 | ...); None = `dtype` weights
    int4_group: int | None = None  # int4 group size (None = the engine's default)
    cpu_kernel: str = "torch"  # CPU int4 kernel: torch | onnxruntime | ggml (`--cpu-kernel`)

    def expert_format(self) -> ExpertFormat:
        """Experts stored as the engine stores them, computed with activations of `dtype`."""
        return ExpertFormat.parse(self.expert_dtype, DTYPES[self.dtype], self.int4_group)

    def expert_shape(self, intermediate: int | None = None) -> ExpertShape:
        """The expert at its stored bits per weight (scales and padding included)."""
        i = self.intermediate if intermediate is None else intermediate
        nbytes = expert_nbytes(self.expert_format(), i, self.hidden)
        return ExpertShape(self.hidden, i, 8.0 * nbytes / (3 * self.hidden * i))


class _Experts:
    """`count` experts, each one contiguous buffer in the engine's layout for `fmt` (float
    [gate | up | down], or int8/int4 codes and scales quantised on the host), then moved to `device`
    (the stored bytes, as a cache copy moves them), computed with the engine's own kernels."""

    def __init__(self, h: int, i: int, fmt: ExpertFormat, device: torch.device, count: int, seed: int = 0,
                 cpu_kernel: str = "torch") -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        layout = ExpertLayout(fmt, i, h)
        first = torch.empty(layout.numel, dtype=fmt.storage_dtype)
        if fmt.quantized:
            layout.write_matrix(first, 0, torch.randn(2 * i, h, generator=gen) * h ** -0.5)
            layout.write_matrix(first, 1, torch.randn(h, i, generator=gen) * i ** -0.5)
        else:
            first.copy_(torch.randn(3 * h * i, generator=gen) * h ** -0.5)
        # copies of one expert: different memory, same numbers (quantising each would take long)
        self.buffers = [first.to(device)] + [first.to(device, copy=True) for _ in range(count - 1)]
        self.views = [layout.view(b) for b in self.buffers]
        if cpu_kernel != "torch" and device.type == "cpu":
            from hybrimoe.moe.ort_kernels import OrtExpert, check_cpu_kernel

            check_cpu_kernel(cpu_kernel)
            if cpu_kernel == "ggml":
                from hybrimoe.moe.ggml_kernels import GgmlExpert
                build: Any = GgmlExpert.build
            else:
                build = OrtExpert.build
            built = [build(v) if fmt.name == "int4" else None for v in self.views]
            if any(b is None for b in built):
                raise ConfigError(f"--cpu-kernel {cpu_kernel} computes int4 experts, not {fmt.describe()}")
            self.views = built  # each copy in the kernel's own memory
        self.nbytes = layout.nbytes

    def run(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.views[index % len(self.views)].forward(x)  # [T, H]


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; accepted: auto, cpu, cuda")
    return torch.device(name)


def measure_cpu_experts(s: CalibrationSettings, progress: Callable[[str], None]) -> dict[str, list]:
    """Per token count: the median first-expert time and the median later-expert time (s)."""
    dtype, fmt = DTYPES[s.dtype], s.expert_format()
    per_expert = expert_nbytes(fmt, s.intermediate, s.hidden)  # B
    count = max(s.experts_per_layer + 1, min(64, -(-(s.evict_bytes * 2) // per_expert)))
    experts = _Experts(s.hidden, s.intermediate, fmt, torch.device("cpu"), count, cpu_kernel=s.cpu_kernel)
    evict = torch.ones(s.evict_bytes // 4, dtype=torch.float32)
    out: dict[str, list] = {"tokens": [], "first": [], "later": []}
    cursor = 0
    for n in s.token_counts:
        x = torch.randn(n, s.hidden).to(dtype)
        experts.run(cursor, x)  # warm-up of this shape's kernels
        firsts, laters = [], []
        for _ in range(s.layers):
            evict.add_(1.0)  # the "attention" between layers: streams other memory through the caches
            time.sleep(s.pause_s)
            for k in range(s.experts_per_layer):
                cursor += 1
                t0 = time.perf_counter()
                experts.run(cursor, x)
                (firsts if k == 0 else laters).append(time.perf_counter() - t0)
        out["tokens"].append(n)
        out["first"].append(_median(firsts))
        out["later"].append(_median(laters))
        progress(f"cpu expert {s.hidden}x{s.intermediate} {fmt.describe()}, {n:4d} tokens: "
                 f"first {out['first'][-1] * 1e3:.3f} ms, later {out['later'][-1] * 1e3:.3f} ms")
    # a second, half-width expert at one token separates bytes/bandwidth from the fixed overhead
    half = max(1, s.intermediate // 2)
    small = _Experts(s.hidden, half, fmt, torch.device("cpu"), count, seed=1)
    x = torch.randn(1, s.hidden).to(dtype)
    small.run(0, x)
    times = []
    for k in range(s.layers * s.experts_per_layer):
        t0 = time.perf_counter()
        small.run(k + 1, x)
        times.append(time.perf_counter() - t0)
    out["small_intermediate"] = [half]
    out["small_bytes"] = [small.nbytes]
    out["small_t1"] = [_median(times)]
    progress(f"cpu expert {s.hidden}x{half} {fmt.describe()}, 1 token: {out['small_t1'][0] * 1e3:.3f} ms")
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return max(median, 1e-9)  # s: below the clocks' resolution; the fits need positive times


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on the current stream, or wall clock on the CPU."""
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3  # ms -> s
        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return cpu_time


def measure_gpu(s: CalibrationSettings, device: torch.device, progress: Callable[[str], None]) -> dict[str, list]:
    """Resident-expert times per token count, copy times per size, a dense GEMM and launch overhead."""
    dtype, timer = DTYPES[s.dtype], _timer(device)
    experts = _Experts(s.hidden, s.intermediate, s.expert_format(), device, 2, seed=1)
    out: dict[str, list] = {"tokens": [], "expert": [], "copy_bytes": [], "copy": []}
    for n in s.token_counts:
        x = torch.randn(n, s.hidden, device=device).to(dtype)
        samples = []
        for k in range(2 + 2 * s.layers):
            seconds = timer(lambda: experts.run(k, x))
            if k >= 2:  # the first two calls warm up kernels and autotuning
                samples.append(seconds)
        out["tokens"].append(n)
        out["expert"].append(_median(samples))
        progress(f"{device.type} resident expert, {n:4d} tokens: {out['expert'][-1] * 1e3:.3f} ms")
    size = experts.nbytes  # B: what a cache copy moves in this format
    for fraction in (8, 4, 2, 1):
        nbytes = max(1, size // fraction)
        if device.type == "cuda":
            host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
            dest = torch.empty(nbytes, dtype=torch.uint8, device=device)
            stream = torch.cuda.Stream(device)
            samples = []
            for k in range(2 + s.layers):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    start.record(stream)
                    dest.copy_(host, non_blocking=True)
                    end.record(stream)
                end.synchronize()
                if k >= 2:
                    samples.append(start.elapsed_time(end) * 1e-3)
        else:
            host, dest = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
            samples = [timer(lambda: dest.copy_(host)) for _ in range(2 + s.layers)][2:]
        out["copy_bytes"].append(nbytes)
        out["copy"].append(_median(samples))
        progress(f"{'pinned host->' + device.type if device.type == 'cuda' else 'host->host'} copy "
                 f"{nbytes / 2**20:.2f} MiB: {out['copy'][-1] * 1e3:.3f} ms")
    tokens = max(s.token_counts) if device.type == "cpu" else max(1024, max(s.token_counts))  # prefill-sized on a GPU
    a = torch.randn(tokens, s.hidden, device=device).to(dtype)
    w = torch.randn(4 * s.hidden, s.hidden, device=device).to(dtype)
    gemm = [timer(lambda: torch.nn.functional.linear(a, w)) for _ in range(2 + s.layers)][2:]
    out["dense_tokens"] = [tokens]
    out["dense_flops"] = [2.0 * tokens * s.hidden * 4 * s.hidden / _median(gemm)]
    tiny = torch.zeros(1, s.hidden, device=device)
    launches = [timer(lambda: [tiny.add_(1.0) for _ in range(15)]) for _ in range(2 + s.layers)][2:]
    out["layer_overhead"] = [_median(launches)]  # ~15 small kernels, as in one layer's dense part
    progress(f"{device.type} dense GEMM {out['dense_flops'][0] / 1e12:.2f} TFLOP/s, "
             f"15 launches {out['layer_overhead'][0] * 1e6:.1f} us")
    return out


def calibrate(s: CalibrationSettings, name: str = "measured",
              progress: Callable[[str], None] | None = None) -> CostModel:
    """Measure and fit; returns the profile (save it with `.save(path)`)."""
    if s.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {s.dtype!r}; accepted: {', '.join(DTYPES)}")
    if not s.token_counts or min(s.token_counts) < 1:
        raise ConfigError(f"token counts must be >= 1, got {s.token_counts}")
    progress = progress or log.info
    device = _pick_device(s.device)
    threads_before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _calibrate(s, name, progress, device)
    finally:
        torch.set_num_threads(threads_before)


def _calibrate(s: CalibrationSettings, name: str, progress: Callable[[str], None], device: torch.device) -> CostModel:
    host = f"{platform.node() or 'unknown host'} ({platform.processor() or platform.machine()}, " \
           f"{torch.get_num_threads()} torch threads)"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = measure_cpu_experts(s, progress)
    gpu = measure_gpu(s, device, progress)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return fit_profile(s, cpu, gpu, name, f"measured on {host} at {when}", gpu_name)


def fit_profile(s: CalibrationSettings, cpu: dict[str, list], gpu: dict[str, list], name: str, where: str,
                gpu_name: str = "cpu") -> CostModel:
    """The profile fitted to timing samples (the dicts `measure_cpu_experts` and `measure_gpu` return;
    tests feed synthetic ones). Expert bytes are the format's stored bytes (`s.expert_shape()`)."""
    shape = s.expert_shape()
    fmt = s.expert_format()
    gwhere = f"{where}, GPU {gpu_name}" if gpu_name != "cpu" else f"{where}; no CUDA device, so measured on cpu"
    about = (f"expert {s.hidden}x{s.intermediate} {fmt.describe()} ({shape.bytes / 2**20:.1f} MiB, activations {s.dtype}), "
             f"tokens {list(s.token_counts)}")
    c_fit = fit_roofline_two_sizes(cpu["tokens"], cpu["later"], shape.flops(1), shape.bytes,
                                   cpu["small_bytes"][0], cpu["small_t1"][0]) or fit_roofline(cpu["tokens"], cpu["later"])
    penalty = fit_penalty([c_fit.predict(n) for n in cpu["tokens"]], cpu["first"])
    g_fit = fit_roofline(gpu["tokens"], gpu["expert"])
    latency, per_byte = fit_affine(gpu["copy_bytes"], gpu["copy"])
    copy_kind = "pinned host -> device" if gpu_name != "cpu" else "host -> host"
    kernel = (f"; CPU kernel: torch's fused {fmt.name} kernel up to {CPU_FUSED_KERNEL_MAX_TOKENS[fmt.name]} tokens, "
              "dequantise + GEMM above" if fmt.quantized else "")
    if s.cpu_kernel == "onnxruntime":
        kernel = (f"; CPU kernel: onnxruntime MatMulNBits (int8 activations) up to "
                  f"{CPU_FUSED_KERNEL_MAX_TOKENS['onnxruntime']} tokens")
    elif s.cpu_kernel == "ggml":
        kernel = "; CPU kernel: ggml (llama.cpp's Q4_0/Q4_1 x Q8 kernels), every token count"
    values = {
        "cpu_bits": (shape.bits, f"{fmt.describe()} experts as stored (scales included), as measured{kernel}"),
        "gpu_bits": (shape.bits, f"{fmt.describe()} experts as stored and copied, as measured"),
        "dense_bits": (BITS[s.dtype], f"{s.dtype} dense weights"),
        "cpu_stream_bandwidth": (shape.bytes / c_fit.flat, f"{where}: {about}; expert bytes / fitted flat time {c_fit.note}"),
        "cpu_flops": (shape.flops(1) / c_fit.slope, f"{where}: {about}; flops per token / fitted time per token {c_fit.note}"),
        "cpu_expert_overhead": (c_fit.intercept, f"{where}: {about}; fitted fixed time per expert"),
        "cpu_first_expert_penalty": (penalty, f"{where}: {about}; least-squares ratio of first-expert to later-expert times"
                                     f" (after an eviction sweep of {s.evict_bytes >> 20} MiB and a {s.pause_s * 1e3:g} ms pause)"),
        "gpu_hbm_bandwidth": (shape.bytes / g_fit.flat, f"{gwhere}: {about}; resident expert, bytes / fitted flat time {g_fit.note}"),
        "gpu_flops": (shape.flops(1) / g_fit.slope, f"{gwhere}: {about}; resident expert, flops per token / fitted time per token {g_fit.note}"),
        "gpu_dense_flops": (gpu["dense_flops"][0], f"{gwhere}: [{gpu['dense_tokens'][0]}, {s.hidden}] x [{s.hidden}, {4 * s.hidden}] GEMM"),
        "gpu_kernel_overhead": (g_fit.intercept, f"{gwhere}: {about}; fitted fixed time per resident expert"),
        "gpu_layer_overhead": (gpu["layer_overhead"][0], f"{gwhere}: 15 back-to-back tiny kernels"),
        "pcie_bandwidth": (1.0 / per_byte, f"{gwhere}: {copy_kind} copies of {[b for b in gpu['copy_bytes']]} B, least-squares slope"),
        "pcie_latency": (latency, f"{gwhere}: least-squares intercept of the same copies"),
    }
    assert set(values) == set(PARAMETERS)
    samples = {"cpu": cpu, "gpu": gpu, "gpu_device": gpu_name, "settings": vars(s) | {"token_counts": list(s.token_counts)}}
    extra = {"samples": samples, "expert_format": fmt.describe(), "cpu_kernel": s.cpu_kernel}
    if fmt.quantized:
        extra["cpu_fused_kernel_max_tokens"] = CPU_FUSED_KERNEL_MAX_TOKENS[fmt.name]
    return CostModel(name=name, description=f"Measured by `hybrimoe calibrate`: {where}.",
                     derivations={k: v[1] for k, v in values.items()}, extra=extra,
                     **{k: float(v[0]) for k, v in values.items()})
