"""CPU expert kernels per format: ms per expert and GB/s of weight bytes, next to raw read bandwidth.

    .venv/bin/python benchmarks/bench_expert_kernels.py --out benchmarks/results/expert_kernels.json

For each expert shape (Mixtral-8x7B: H 4096, I 14336; DeepSeek-V2-Lite: H 2048, I 1408), each format
(bf16; int8; int4 with group 32 and 128) and each token count (1, 8, 32, 128), one SwiGLU expert is run
from the store's own layout (hybrimoe.moe.expert_layout) with each CPU kernel the engine can choose:
"fused" (aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu), "dequant" (dequantise + F.linear),
"auto" (what the engine picks: hybrimoe.policy.cost.CPU_FUSED_KERNEL_MAX_TOKENS) and, for int4 with
`--kernels ...,onnxruntime`, "onnxruntime" (`--cpu-kernel onnxruntime`: one MatMulNBits session per
expert copy, hybrimoe.moe.ort_kernels; its weight bytes are counted as our int4 layout's) and, with
`--kernels ...,ggml`, "ggml" (`--cpu-kernel ggml`: llama.cpp's kernels, hybrimoe.moe.ggml_kernels; Q4_0 blocks,
repacked, for the q4_0 format only; its weight bytes are ggml's own, 18 per 32 weights). Format q4_0 is int4 by Q4_0's symmetric rule (`--expert-dtype q4_0`). Enough copies of
the expert rotate that their bytes exceed the last-level cache 8x, so every call reads weights from
DRAM as a decode step does. Rounds are interleaved (every configuration once per round; the median
over rounds is reported) so that other processes on a shared machine disturb all alike.
Raw read bandwidth: torch.sum over a 512 MiB fp32 tensor with the same threads, in the same rounds.
One JSON row per (shape, format, group, tokens, kernel), plus a header row with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hybrimoe.moe import kernels
from hybrimoe.moe.expert_layout import ExpertLayout
from hybrimoe.moe.quant import ExpertFormat
from machine import cpu_model  # benchmarks/machine.py

SHAPES = {"mixtral-8x7b": (4096, 14336), "deepseek-v2-lite": (2048, 1408)}
FORMATS = (("bf16", 0), ("int8", 0), ("int4", 32), ("int4", 128), ("q4_0", 32))
INT4 = ("int4", "q4_0")  # formats the int4 kernels (onnxruntime, ggml) take
TOKENS = (1, 8, 32, 128)
LLC_BYTES = 32 << 20




def make_experts(name: str, group: int, hidden: int, inter: int, seed: int = 0) -> tuple[list, int]:
    fmt = ExpertFormat.parse(name, torch.bfloat16, group or 32)
    layout = ExpertLayout(fmt, inter, hidden)
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.empty(layout.numel, dtype=fmt.storage_dtype)
    gate_up = torch.randn(2 * inter, hidden, generator=gen) * hidden ** -0.5
    down = torch.randn(hidden, inter, generator=gen) * inter ** -0.5
    if fmt.quantized:
        layout.write_matrix(buffer, 0, gate_up)
        layout.write_matrix(buffer, 1, down)
    else:
        buffer.copy_(torch.cat((gate_up.reshape(-1), down.reshape(-1))))
    del gate_up, down
    copies = max(2, -(-8 * LLC_BYTES // layout.nbytes))
    buffers = [buffer] + [buffer.clone() for _ in range(copies - 1)]
    return [layout.view(b) for b in buffers], layout.nbytes


def run_expert(expert, x: torch.Tensor, kernel: str, fmt: str) -> None:
    if kernel in ("onnxruntime", "ggml"):  # `expert` is an OrtExpert / GgmlExpert
        expert.forward(x)
        return
    if kernel == "auto" or fmt == "bf16":
        kernels.set_fused_kernels(True)
        expert.forward(x)
        return
    saved = dict(kernels.CPU_FUSED_KERNEL_MAX_TOKENS)
    kernels.set_fused_kernels(kernel == "fused")
    kernels.CPU_FUSED_KERNEL_MAX_TOKENS.update({"int8": 1 << 30, "int4": 1 << 30})
    try:
        expert.forward(x)
    finally:
        kernels.CPU_FUSED_KERNEL_MAX_TOKENS.update(saved)
        kernels.set_fused_kernels(True)


def key(config: tuple) -> tuple:
    """The experts a configuration (format, group, tokens, kernel) runs: the kernel's copies or the views."""
    return (config[3], *config[:2]) if config[3] in ("onnxruntime", "ggml") else config[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", default="auto,fused,dequant",
                        help="comma list of auto, fused, dequant, onnxruntime, ggml (run onnxruntime and ggml in "
                             "separate processes: onnxruntime's global pool spins between runs and slows ggml's)")
    parser.add_argument("--formats", default=",".join(f"{f}:{g}" if g else f for f, g in FORMATS),
                        help="comma list of FORMAT[:GROUP] (default: all)")
    parser.add_argument("--out", default=None, help="JSON rows file (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    kinds = args.kernels.split(",")
    formats = [(f.split(":")[0], int(f.split(":")[1]) if ":" in f else 0) for f in args.formats.split(",")]
    header = {"kind": "machine", "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
              "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "load_before": os.getloadavg(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "measured": True}
    rows = [header]
    print(json.dumps(header), flush=True)
    raw = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    for shape in args.shapes.split(","):
        hidden, inter = SHAPES[shape]
        configs, experts = [], {}
        for fmt, group in formats:
            experts[(fmt, group)] = make_experts(fmt, group, hidden, inter)
            for n in tokens:
                for kernel in (["auto"] if fmt == "bf16" else kinds):
                    if kernel not in ("onnxruntime", "ggml") or fmt in INT4 and (kernel != "ggml" or fmt == "q4_0"):
                        configs.append((fmt, group, n, kernel))
            if fmt in INT4 and "onnxruntime" in kinds:
                from hybrimoe.moe.ort_kernels import OrtExpert
                experts[("onnxruntime", fmt, group)] = ([OrtExpert.build(v) for v in experts[(fmt, group)][0]],
                                                        experts[(fmt, group)][1])
            if fmt == "q4_0" and "ggml" in kinds:  # ggml computes symmetric int4 only
                from hybrimoe.moe.ggml_kernels import GgmlExpert
                built = [GgmlExpert.build(v) for v in experts[(fmt, group)][0]]
                experts[("ggml", fmt, group)] = (built, built[0].nbytes)
        xs = {n: torch.randn(n, hidden, dtype=torch.bfloat16) for n in tokens}
        times: dict[tuple, list[float]] = {c: [] for c in configs}
        reads: list[float] = []
        cursor = 0
        with torch.inference_mode():
            for c in configs:  # warm-up
                run_expert(experts[key(c)][0][0], xs[c[2]], c[3], c[0])
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                raw.sum()
                reads.append(time.perf_counter() - t0)
                for c in configs:
                    views = experts[key(c)][0]
                    cursor += 1
                    t0 = time.perf_counter()
                    run_expert(views[cursor % len(views)], xs[c[2]], c[3], c[0])
                    times[c].append(time.perf_counter() - t0)
        raw_gbps = raw.numel() * 4 / statistics.median(reads) / 1e9
        for c in configs:
            fmt, group, n, kernel = c
            nbytes = experts[key(c)][1]
            seconds = statistics.median(times[c])
            row = {"kind": "expert", "shape": shape, "hidden": hidden, "intermediate": inter, "format": fmt,
                   "group": group or None, "tokens": n, "kernel": kernel, "ms": round(seconds * 1e3, 4),
                   "weight_bytes": nbytes, "GBps": round(nbytes / seconds / 1e9, 3),
                   "raw_read_GBps": round(raw_gbps, 3), "fraction_of_raw": round(nbytes / seconds / 1e9 / raw_gbps, 3),
                   "rounds": args.rounds, "measured": True}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del experts
    rows.append({"kind": "end", "load_after": os.getloadavg()})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
