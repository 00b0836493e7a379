"""CPU int4 kernels from onnxruntime (`--cpu-kernel onnxruntime`): MLAS's MatMulNBits, int8 activations x
int4 weights on integer SIMD (AVX-512 VNNI / AVX2), the scheme llama.cpp's Q4_0 x Q8_0 dot uses.

    onnxruntime_available()                     -> bool (the optional `onnxruntime` and `onnx` packages)
    ort_int4_weights(Int4View)                  -> OrtInt4 (codes, scales, integer zero points) | None
    OrtExpert.build(QuantExpert)                one session per expert: down @ (silu(g) * u), [T, H] -> [T, H]
    OrtMatmul.build(view)                       one session per matrix: x [T, K] -> [T, N]
    OrtMatmul.stacked([views])                  one session for matrices stacked along N (fused q/k/v)
Both hand more than CPU_FUSED_KERNEL_MAX_TOKENS["onnxruntime"] tokens (measured crossover) to the torch
view they were built from.

Numerics (onnxruntime's `accuracy_level=4`): each run quantises x to int8 per block of `group` inputs
(symmetric, scale = max|x| / 127, round to nearest), multiplies with the int4 codes in integers and
scales the block sums in fp32: w = (q - zp) * scale with an INTEGER zero point zp per group. Only int4
matrices whose stored zero is an integer code (zero = (8 - zp) * scale, what `quantize_int4` and GGUF
Q4_0 give) can run here; GGUF Q4_K's fractional offsets cannot and stay on torch's kernel.
tests/test_ort_kernels.py re-implements this in plain torch and compares against it.

Memory: onnxruntime packs each matrix into its own layout at session creation (MLAS reorders the codes
and keeps fp32 scales and per-block sums) and never reads our arrays again (the tests check this by
overwriting them); the packed copy is host memory next to the expert store (measured 1.5x the int4
bytes at group 32, 1.2x at 128: benchmarks/RESULTS_formats.md; a CPU-only engine then frees the store's
own copy, `ExpertStore.release_host_copy`). One global onnxruntime thread pool serves every session (torch's
thread count, or the hybrid runtime's CPU worker threads). Each session asks for no spinning
(`session.intra_op.allow_spinning` = 0), which the global pool ignores: its workers spin between runs
(measured: beside ggml's pool, `--cpu-kernel ggml`, a decode token took 34 instead of 12.4 ms; with ggml
the dense linears' sessions therefore get sleeping pools of their own, `_runtime(per_session=True)`). A CPU-only engine
leaves the cores to onnxruntime (`leave_cores_to_onnxruntime`: torch at one thread).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hybrimoe.errors import ConfigError
from hybrimoe.moe.kernels import Int4View, QuantExpert
from hybrimoe.policy.cost import CPU_FUSED_KERNEL_MAX_TOKENS

log = logging.getLogger(__name__)

CPU_KERNELS = ("torch", "onnxruntime", "ggml")
ZERO_TOLERANCE = 0.05  # |8 - zero/scale - zp| allowed: a bf16 zero rounds (8 - zp) * scale by <= 8 * 2^-9
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (the fast path; 0/1 dequantise to fp32, 3-4x slower here)
_STATE: dict[str, Any] = {"threads": None, "per_session": False}
_LOCK = threading.Lock()


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def check_cpu_kernel(name: str) -> str:
    """`name` validated ("torch" | "onnxruntime" | "ggml"); ConfigError naming the fix when its library is
    missing."""
    if name not in CPU_KERNELS:
        raise ConfigError(f"unknown CPU kernel {name!r}; supported: {', '.join(CPU_KERNELS)}")
    if name == "ggml":
        from hybrimoe.moe.ggml_lib import INSTALL_HINT, ggml_available
        if not ggml_available():
            raise ConfigError(INSTALL_HINT)
    if name == "onnxruntime" and not onnxruntime_available():
        raise ConfigError("--cpu-kernel onnxruntime needs the onnxruntime and onnx packages: "
                          "pip install 'hybrimoe[onnxruntime]' (or: pip install onnxruntime onnx)")
    return name


def _runtime(threads: int | None = None, per_session: bool = False) -> Any:
    """onnxruntime, with its threads set up once per process: `threads` (default: torch's thread count) at the
    first call; later calls get the same whatever they ask. One global pool, whose workers spin between runs
    (the pool of `set_global_thread_pool_sizes` takes no spin setting); `per_session`: instead a pool of
    `threads` per session that sleeps between runs (`session.intra_op.allow_spinning` = 0), for a process
    whose heavy work runs on another pool (ggml's experts: beside the spinning global pool a Mixtral-shaped
    decode token took 34 ms on the 2-vCPU Zen 4, 12.4 with sleeping per-session pools)."""
    import onnxruntime as ort

    with _LOCK:
        if _STATE["threads"] is None:
            ort.set_default_logger_severity(3)  # errors only (one warning per session otherwise)
            count = threads or torch.get_num_threads()
            if not per_session:
                from onnxruntime.capi import _pybind_state
                _pybind_state.set_global_thread_pool_sizes(count, 1)
            _STATE["threads"], _STATE["per_session"] = count, per_session
            log.info("onnxruntime CPU kernels: %d threads%s", count, " per session" if per_session else "")
        elif per_session and not _STATE["per_session"]:
            log.warning("onnxruntime's global thread pool already runs in this process; its spinning workers "
                        "slow down ggml's kernels")
    return ort



@dataclass(frozen=True)
class OrtInt4:
    """One [N, K] int4 matrix in MatMulNBits' input layout (plain numpy, consumed at session creation)."""
    codes: np.ndarray  # uint8 [N, K/g, g/2]: byte j of a block = code 2j (low nibble) | code 2j+1 << 4
    scales: np.ndarray  # float32 [N * K/g]
    zero_points: np.ndarray  # uint8 [N * ceil((K/g)/2)]: two zero points a byte, low nibble first, per row
    n: int
    k: int
    group: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zero_points.nbytes


def integer_zero_points(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """zp [N, K/g] uint8 with zero == (8 - zp) * scale (to ZERO_TOLERANCE), or None if any group has none.
    scale/zero [N, K/g] as stored (w = (q - 8) * scale + zero)."""
    scale, zero = scale.float(), zero.float()
    flat = scale == 0
    ratio = 8.0 - zero / torch.where(flat, torch.ones_like(scale), scale)
    zp = ratio.round()
    ok = ((ratio - zp).abs() <= ZERO_TOLERANCE) & (zp >= 0) & (zp <= 15)
    ok = torch.where(flat, zero == 0, ok)  # an all-equal group: its value must be 0
    if not bool(ok.all()):
        return None
    return torch.where(flat, torch.full_like(zp, 8), zp).to(torch.uint8)


def ort_int4_weights(view: Int4View) -> OrtInt4 | None:
    """The matrix of `view` (host or device) in MatMulNBits' layout; None when a zero is not an integer code."""
    n, k, g = view.n, view.k, view.group
    if g % 16 or k % g:
        return None  # MatMulNBits blocks are 16..256 inputs, powers of two
    scale, zero = view.sz[..., 0].t().cpu(), view.sz[..., 1].t().cpu()  # [N, K/g]
    zp = integer_zero_points(scale, zero)
    if zp is None:
        return None
    codes = view.layout.unpack(view.packed.cpu(), n, k).to(torch.uint8).view(n, k // g, g // 2, 2)
    packed = (codes[..., 0] | (codes[..., 1] << 4)).contiguous()  # [N, K/g, g/2]
    blocks = k // g
    zp_rows = torch.nn.functional.pad(zp, (0, blocks % 2), value=8).view(n, -1, 2)  # [N, ceil(K/g/2), 2]
    zp_bytes = (zp_rows[..., 0] | (zp_rows[..., 1] << 4)).reshape(-1)
    return OrtInt4(packed.numpy(), scale.float().reshape(-1).numpy().copy(), zp_bytes.contiguous().numpy(), n, k, g)


def stack_int4(parts: list[OrtInt4 | None]) -> OrtInt4 | None:
    """One matrix of `parts` stacked along N (same K and group), or None when any is None or they differ."""
    if any(p is None for p in parts) or len({(p.k, p.group) for p in parts}) != 1:
        return None
    return OrtInt4(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                   np.concatenate([p.zero_points for p in parts]), sum(p.n for p in parts), parts[0].k,
                   parts[0].group)


def _external(name: str, onnx_type: int, dims: list[int]) -> Any:
    """An initializer declared in the graph whose data comes from SessionOptions.add_external_initializers."""
    from onnx import TensorProto

    t = TensorProto()
    t.name, t.data_type, t.data_location = name, onnx_type, TensorProto.EXTERNAL
    t.dims.extend(dims)
    entry = t.external_data.add()
    entry.key, entry.value = "location", "memory"
    return t


def matmul_node(prefix: str, x: str, y: str, w: OrtInt4, inits: list[Any], feeds: dict[str, np.ndarray]) -> Any:
    from onnx import TensorProto, helper

    names = (f"{prefix}_codes", f"{prefix}_scales", f"{prefix}_zp")
    for name, array, onnx_type in zip(names, (w.codes, w.scales, w.zero_points),
                                      (TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8)):
        inits.append(_external(name, onnx_type, list(array.shape)))
        feeds[name] = array
    return helper.make_node("MatMulNBits", [x, *names], [y], domain="com.microsoft", K=w.k, N=w.n, bits=4,
                            block_size=w.group, accuracy_level=ACCURACY_LEVEL)


def _session(nodes: list[Any], inits: list[Any], feeds: dict[str, np.ndarray], k: int, n: int) -> Any:
    """A CPU session for graph `nodes` (x [T, k] fp32 -> y [T, n] fp32). The arrays in `feeds` are only read
    while the session is created (MatMulNBits packs them into its own memory)."""
    from onnx import TensorProto, helper

    return graph_session(nodes, inits, feeds, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])])


def graph_session(nodes: list[Any], inits: list[Any], feeds: dict[str, np.ndarray], inputs: list[Any],
                  outputs: list[Any]) -> Any:
    """A CPU session on the global pool for a graph of `nodes` (opset 21 and com.microsoft), onnx value infos
    `inputs` -> `outputs`; `feeds`: the external initializers, only read while the session is created."""
    from onnx import helper

    ort = _runtime()
    graph = helper.make_graph(nodes, "hybrimoe", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    if _STATE["per_session"]:
        options.intra_op_num_threads = _STATE["threads"]
    else:
        options.use_per_session_threads = False  # the global pool (`_runtime`)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in feeds.values()]
    options.add_external_initializers(list(feeds), values)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: Any, x: torch.Tensor) -> torch.Tensor:
    """x [T, K] (any float dtype, CPU) -> y [T, N] in x's dtype."""
    a = x.detach().to(torch.float32).contiguous().numpy()
    y = torch.from_numpy(session.run(None, {"x": a})[0])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@dataclass(frozen=True)
class OrtMatmul:
    """x [T, K] @ W^T for one int4 matrix, computed by onnxruntime on the CPU."""
    session: Any
    fallback: Int4View | None  # more tokens than the crossover (None: this session takes every token count)
    nbytes: int  # the int4 bytes handed to onnxruntime (its packed copy is about 1.5x this at group 32)

    @classmethod
    def build(cls, view: Int4View) -> OrtMatmul | None:
        return cls._of(ort_int4_weights(view), view)

    @classmethod
    def stacked(cls, views: list[Int4View]) -> OrtMatmul | None:
        """ONE session for the matrices of `views` stacked along N (same K and group; e.g. q/k/v
        projections: one call instead of three). It has no fallback: it computes every token count (its
        caller, StackedLinears, runs the linears one by one above the crossover)."""
        return cls._of(stack_int4([ort_int4_weights(v) for v in views]), None)

    @classmethod
    def _of(cls, w: OrtInt4 | None, fallback: Int4View | None) -> OrtMatmul | None:
        if w is None:
            return None
        inits: list[Any] = []
        feeds: dict[str, np.ndarray] = {}
        node = matmul_node("w", "x", "y", w, inits, feeds)
        return cls(_session([node], inits, feeds, w.k, w.n), fallback, w.nbytes)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N] in x's dtype."""
        if self.fallback is not None and x.shape[0] > CPU_FUSED_KERNEL_MAX_TOKENS["onnxruntime"]:
            return self.fallback.matmul(x)
        return _run(self.session, x)


@dataclass(frozen=True)
class OrtExpert:
    """f(x) = down @ (silu(gate @ x) * (up @ x)) in ONE onnxruntime run (gate_up [2I, H], down [H, I])."""
    session: Any
    fallback: QuantExpert | None  # more tokens than the crossover (None: the store's copy was released)
    nbytes: int

    @classmethod
    def build(cls, expert: QuantExpert) -> OrtExpert | None:
        """None when a matrix is not int4 or has a non-integer zero point (it then stays on torch's kernel)."""
        from onnx import helper

        if not isinstance(expert.gate_up, Int4View) or not isinstance(expert.down, Int4View):
            return None
        a, b, intermediate = ort_int4_weights(expert.gate_up), ort_int4_weights(expert.down), expert.intermediate
        if a is None or b is None:
            return None
        inits: list[Any] = []
        feeds: dict[str, np.ndarray] = {}
        nodes = [matmul_node("gate_up", "x", "h", a, inits, feeds),                    # [T, 2I]
                 helper.make_node("Split", ["h"], ["g", "u"], axis=-1, num_outputs=2),   # [T, I] each
                 helper.make_node("Sigmoid", ["g"], ["sg"]),
                 helper.make_node("Mul", ["g", "sg"], ["silu"]),
                 helper.make_node("Mul", ["silu", "u"], ["act"]),
                 matmul_node("down", "act", "y", b, inits, feeds)]                      # [T, H]
        assert a.n == 2 * intermediate and b.k == intermediate
        return cls(_session(nodes, inits, feeds, a.k, b.n), expert, a.nbytes + b.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] in x's dtype."""
        if self.fallback is not None and x.shape[0] > CPU_FUSED_KERNEL_MAX_TOKENS["onnxruntime"]:
            return self.fallback.forward(x)
        return _run(self.session, x)


def release_free_heap() -> None:
    """Hands the heap that building the sessions freed back to the OS (glibc's malloc_trim; a no-op
    elsewhere). Measured on the 1 GB benchmark model (group 32): the process kept 2.26x the int4 bytes after
    the build without it, 1.5x with it (onnxruntime's packed copy)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
