"""Where one CPU decode token goes: per-part timers (module hooks) and torch.profiler's op table.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_decode_cpu.py --dense-dtype int4 --threads 2

The model is benchmarks/bench_vs_llamacpp.py's (random Mixtral-shaped weights, int4 g32 experts; same
size flags), decoded greedily by the plain engine (the reference executor: what `hybrimoe generate`
runs on a CPU-only machine without runtime flags). Parts, each summed over the layers, ms per token:
  attn_proj   q/k/v/o projections (nn.Linear or the quantised linear that replaces it)
  attn_core   the rest of the attention module: rotary, KV append, scores, softmax, weighted sum
  norms       RMSNorms (input, post-attention, final)
  router      the MoE gate matmul and top-k routing (the block minus its executor)
  experts     the executor: grouping, routed expert matmuls, combine
  lm_head     the output projection
  layer_graphs  with --cpu-kernel onnxruntime: the per-layer decode graphs (hybrimoe.models.ort_decode:
              norms, q/k/v/o, attention, router logits in one onnxruntime run per layer; with --cpu-kernel
              ggml and --dense-dtype q4_0 one ggml graph per layer, hybrimoe.models.ggml_decode, which also
              computes the previous layer's routed experts where the block has no shared expert: those
              count here, not in experts; where every block is a softmax top-k router over routed experts
              only, the whole token is one ggml graph, hybrimoe.models.ggml_token: routing and every
              layer's experts count here); attn_proj,
              attn_core and router are then absent, norms is the final norm only, routing is in "other"
              (--no-decode-graph: the torch path around the kernels)
  other       the token's wall time minus all of the above (embedding, residual adds, Python between)
Hooks add a few microseconds per module; the untimed run next to them gives the true total.
Prints one JSON row per measurement; --out appends them to a file. Measured, never in CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", HERE / "bench_vs_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _timed(times: dict[str, float], on: dict[str, bool], part: str, module: nn.Module) -> None:
    """Adds the module's forward wall time to times[part] (seconds) while on["on"]."""
    start: list[float] = []

    def pre(*_: object) -> None:
        start.append(time.perf_counter())

    def post(*_: object) -> None:
        elapsed = time.perf_counter() - start.pop()
        if on["on"]:
            times[part] += elapsed
    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def instrument(model) -> tuple[dict[str, float], dict[str, bool]]:
    """Hooks timers on the model's parts; returns (seconds per part, switch)."""
    from hybrimoe.models.layers import RMSNorm
    from hybrimoe.moe.layer import MoEBlock

    times: dict[str, float] = defaultdict(float)
    on = {"on": False}
    wrapped: set[int] = set()
    for layer in model.model.layers:
        att = layer.self_attn
        _timed(times, on, "attention", att)
        for name, child in att.named_children():
            if name.endswith("_proj"):
                _timed(times, on, "attn_proj", child)
        if isinstance(layer.mlp, MoEBlock):
            _timed(times, on, "moe_block", layer.mlp)
            if id(layer.mlp.executor) in wrapped:  # the blocks share one executor: time it once
                continue
            wrapped.add(id(layer.mlp.executor))
            run = layer.mlp.executor.run

            def timed_run(*a, _run=run, **kw):
                t0 = time.perf_counter()
                out = _run(*a, **kw)
                if on["on"]:
                    times["experts"] += time.perf_counter() - t0
                return out
            layer.mlp.executor.run = timed_run  # on the instance: the executor keeps its type (GgmlDecoder's check)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            _timed(times, on, "norms", module)
    _timed(times, on, "lm_head", model.lm_head)
    decoder = model.ort_decoder
    if decoder is not None:  # its graphs: ggml's every compute (the whole token's where it applies),
        name = "_compute" if hasattr(decoder, "_compute") else "run_layer"  # else onnxruntime's per layer
        run = getattr(decoder, name)

        def timed(*args) -> None:
            t0 = time.perf_counter()
            run(*args)
            if on["on"]:
                times["layer_graphs"] += time.perf_counter() - t0

        setattr(decoder, name, timed)
    return times, on


def decode(model, prompt: list[int], new: int, on: dict[str, bool] | None = None) -> list[float]:
    """Seconds of each of `new` greedy decode tokens after the prompt (timers `on` during decode only)."""
    kv = model.new_kv_cache(len(prompt) + new + 1)
    out = []
    with torch.inference_mode():
        token = int(torch.argmax(model(torch.tensor(prompt), 0, kv)[-1]))
        pos = len(prompt)
        if on is not None:
            on["on"] = True
        for _ in range(new):
            start = time.perf_counter()
            token = int(torch.argmax(model(torch.tensor([token]), pos, kv)[-1]))
            out.append(time.perf_counter() - start)
            pos += 1
        if on is not None:
            on["on"] = False
    return out


def build_model(bench, args: argparse.Namespace):
    """bench_vs_llamacpp.py's model with its dense linears and lm_head in --dense-dtype and the CPU int4
    kernel of --cpu-kernel (torch when the script has no such flag). Shared with ab_decode_cpu.py."""
    from hybrimoe.models.quant_linear import quantize_dense
    from hybrimoe.moe.cpu_kernels import apply_cpu_kernel

    kernel = getattr(args, "cpu_kernel", "torch")
    model = bench.build_ours(args, "q4_0" if kernel == "ggml" else "int4")  # ggml: Q4_0's own codes
    if args.dense_dtype != "bf16":
        quantize_dense(model, args.dense_dtype, args.dense_dtype, args.int4_group)
    apply_cpu_kernel(model, kernel, progress=False)
    if getattr(args, "no_decode_graph", False):
        model.ort_decoder = None
    return model


def main() -> None:
    bench = _bench_module()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profiler", action="store_true", help="also print torch.profiler's top ops")
    parser.add_argument("--cpu-kernel", default="torch", help="our CPU int4 kernel: torch, onnxruntime or ggml (experts in q4_0)")
    parser.add_argument("--no-decode-graph", action="store_true",
                        help="with --cpu-kernel onnxruntime: decode through the torch path around the kernels")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(bench, args)
    if args.cpu_kernel != "torch":
        torch.set_num_threads(1)  # beside the kernel's pools, as `hybrimoe generate` runs it
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(259, args.vocab, (32,), generator=gen).tolist()
    decode(model, prompt, 4)
    plain = statistics.median(decode(model, prompt, args.new_tokens))
    times, on = instrument(model)
    steps = decode(model, prompt, args.new_tokens, on)
    hooked = statistics.mean(steps)
    n = args.new_tokens
    parts = {k: v / n * 1e3 for k, v in times.items()}
    if "attention" in parts:  # the torch path (the decode graph runs neither module)
        parts["attn_core"] = parts.pop("attention") - parts["attn_proj"]
        parts["router"] = parts.pop("moe_block") - parts["experts"]
    parts["other"] = hooked * 1e3 - sum(parts.values())
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    row = {"kind": "profile", "cpu": name, "threads": args.threads, "load": os.getloadavg(),
           "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
           "dense_dtype": args.dense_dtype, "int4_group": args.int4_group, "cpu_kernel": args.cpu_kernel,
           "decode_graph": model.ort_decoder is not None,
           "ms_per_token_plain": round(plain * 1e3, 2),
           "ms_per_token_hooked": round(hooked * 1e3, 2),
           "parts_ms": {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}, "measured": True}
    print(json.dumps(row))
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    if args.profiler:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(model, prompt, 8)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
