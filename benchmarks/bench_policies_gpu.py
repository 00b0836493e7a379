"""Policies on real hardware: prefill time and decode tokens/s per placement policy, with the all-resident
bound, on random weights of a real model shape whose routers replay a real routing trace.

NOT YET RUN ON A GPU: written and smoke-tested on the CPU fallback only (the session that wrote it had no
CUDA device). The CUDA paths (copy stream, events, pinned store) run for the first time on the next GPU run.

    python benchmarks/bench_policies_gpu.py                       # DeepSeek-V2-Lite shape, bf16, CUDA
    python benchmarks/bench_policies_gpu.py --device cpu --dtype fp32 --layers 3 \\
        --override hidden_size=256 moe_intermediate_size=128 vocab_size=512 \\
        --prompt-tokens 8 --decode-tokens 2 --policies hybrimoe,resident   # CPU smoke test

Per policy: a fresh runtime (same model, same routing: the trace cursor rewinds) is installed, warmed up
(one short prefill + decode), then each prompt length is prefilled once and `--decode-tokens` tokens are
decoded greedily. One JSON row per (policy, measurement) on stdout; all rows to $OUT/bench_policies_gpu.json
(or --out). Rows carry the measured seconds next to the cost model's predicted seconds for the same plans
(`predicted_moe_s`: the sum of the executed plans' makespans under the costs the schedulers used, calibrated
at start or --cost-profile: routed-expert work only; with --predict-profile also `profile_*_s`: the same plans
re-timed by that CostModel profile, plus its dense-part and lm_head times, i.e. the simulator's view),
measured busy seconds of cpu worker / gpu compute / copy link, and cache hit rates.
Routing: the eval traces of `--trace-model` (default Qwen1.5-MoE-A2.7B: 24 layers x 60 experts, top-4) mapped
onto the model's MoE layers cyclically; static hot sets come from that model's dev traces (no tuning on
eval data). A trace of another model than the weights is noted in every row (DeepSeek-V2-Lite has no
public trace: its rows run with 4 of its 6 experts per token, Qwen1.5's routing).
Prefetching presets predict the next layers' experts from the replayed trace, as `--replay-trace` does
(an oracle; random gates would predict noise): the `prefetch` field of every row says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Self
from unittest.mock import patch

import torch

from hybrimoe.config import ModelConfig
from hybrimoe.data import packaged_traces
from hybrimoe.loader import build_dummy_model
from hybrimoe.moe.install import install_runtime
from hybrimoe.moe.replay import TraceRouting, install_replay
from hybrimoe.moe.store import ExpertStore
from hybrimoe.policy.presets import PRESETS
from hybrimoe.runtime_options import RuntimeOptions, dummy_config_path
from hybrimoe.trace.format import RoutingTrace
from hybrimoe.trace.importers import load_any_trace

log = logging.getLogger("bench_policies_gpu")
DEFAULT_POLICIES = ("resident", "hybrimoe", "ktransformers", "llamacpp", "gpu-lru", "fiddler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v2-lite", help="shape name (hybrimoe/shapes) or config.json")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="config.json fields to change")
    p.add_argument("--layers", type=int, help="num_hidden_layers override (smaller runs)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--expert-dtype", default=None, choices=("bf16", "fp16", "fp32", "int8", "int4"),
                   help="routed experts' format (default: --dtype)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--cache-ratio", type=float, default=0.25)
    p.add_argument("--per-layer-cache", action="store_true")
    p.add_argument("--cpu-threads", type=int)
    p.add_argument("--cost-profile", help="CostModel profile for the schedulers (default: calibrate here)")
    p.add_argument("--predict-profile", help="also re-time the executed plans with this CostModel profile "
                   "(name or path, e.g. one `hybrimoe calibrate` wrote on this machine) plus its dense-part times")
    p.add_argument("--trace-model", default="qwen1.5-moe-a2.7b", help="packaged traces of this model")
    p.add_argument("--trace", help="replay this trace file instead of the packaged eval traces")
    p.add_argument("--prompt-tokens", default="32,128,512")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for all rows (default $OUT/bench_policies_gpu.json when $OUT is set)")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the config.json dict after --override/--layers)."""
    d = json.loads(Path(dummy_config_path(args.model)).read_text())
    for item in args.override:
        key, _, value = item.partition("=")
        d[key] = json.loads(value)
    if args.layers is not None:
        d["num_hidden_layers"] = args.layers
    return ModelConfig.from_dict(d), d


class ProfilePrediction:
    """Seconds a CostModel profile predicts for the executed plans (re-timed with the profile's expert
    costs at the run's dtype) plus the dense parts (attention, shared experts, lm_head) of the forwards."""

    def __init__(self, profile: str, hf_config: dict, store, dtype_bits: float) -> None:
        from dataclasses import replace

        from hybrimoe.moe.calibrate import profile_costs
        from hybrimoe.policy.cost import CostModel
        from hybrimoe.policy.shape import ModelShape

        self.name = profile
        self.model = replace(CostModel.load(profile), dense_bits=dtype_bits)
        self.shape = ModelShape.from_hf_config(hf_config, "bench")
        self.experts = profile_costs(profile, store)

    def figures(self, plans: list, forwards: list[tuple[int, int]]) -> dict:
        """plans: the executed Plans; forwards: (new tokens, cached tokens) of each forward pass."""
        from hybrimoe.policy.plan import build_plan

        moe = sum(build_plan(p.layer, dict(p.counts), p.gpu_order, p.copies, p.cpu_order, self.experts).makespan
                  for p in plans)
        dense = sum(self.model.gpu_dense_time(self.shape, layer, tokens, context)
                    for tokens, context in forwards for layer in range(self.shape.num_layers))
        dense += sum(self.model.lm_head_time(self.shape, tokens) for tokens, _ in forwards)
        return {"profile": self.name, "profile_moe_s": moe, "profile_dense_s": dense, "profile_total_s": moe + dense}


def concat(traces: list[RoutingTrace]) -> RoutingTrace:
    """One trace whose sequences are those of `traces` in order (sequence ids renumbered)."""
    out = RoutingTrace(traces[0].header, [])
    seq = 0
    for trace in traces:
        for tokens in trace.sequences().values():
            for t in tokens:
                t.seq = seq
                out.tokens.append(t)
            seq += 1
    return out


def traces_for(args: argparse.Namespace) -> tuple[RoutingTrace, RoutingTrace | None, str]:
    if args.trace:
        return load_any_trace(args.trace), None, os.path.basename(args.trace)
    evals = packaged_traces(args.trace_model, "eval")
    devs = packaged_traces(args.trace_model, "dev")
    replay = concat([load_any_trace(t.path) for t in evals])
    hot = concat([load_any_trace(t.path) for t in devs]) if devs else None
    return replay, hot, f"{args.trace_model} eval ({', '.join(t.path.name for t in evals)})"


def build_model(config: ModelConfig, dtype: str, seed: int, pin_memory: bool, expert_dtype: str | None = None):
    """`build_dummy_model`, except that the routed experts are ONE MoE layer's random experts copied into
    every other layer (rotated by the layer's index). Drawing DeepSeek-V2-Lite's 14.4G expert weights
    one expert at a time with torch.randn takes minutes on one thread; copies are memory-bound and
    threaded. The values only matter numerically: the routers replay a trace."""

    def fill_by_copies(store: ExpertStore, generator: torch.Generator, std: float) -> None:
        first, *rest = store.layers
        source = store.layer_tensor(first)  # [E, numel]
        i, h = store.intermediate, store.hidden
        for e, row in enumerate(source):
            if store.format.quantized:  # quantised as the loader does
                store.set_gate_up(first, e, torch.randn(2 * i, h, generator=generator) * std)
                store.set_expert(first, e, down=torch.randn(h, i, generator=generator) * std)
            else:
                row.copy_(torch.randn(row.shape, generator=generator) * std)
        experts = source.shape[0]
        for i, layer in enumerate(rest, 1):
            target, shift = store.layer_tensor(layer), i % experts
            target[:experts - shift].copy_(source[shift:])
            target[experts - shift:].copy_(source[:shift])

    with patch.object(ExpertStore, "fill_random", fill_by_copies):
        return build_dummy_model(config, dtype, seed=seed, pin_memory=pin_memory, expert_dtype=expert_dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt(model, tokens: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (tokens,), generator=gen).to(device)


class Meter:
    """Measures one phase: wall seconds, and the runtime's counters accumulated during it only."""

    def __init__(self, runtime, device: torch.device, profile: ProfilePrediction | None = None,
                 forwards: list[tuple[int, int]] = ()) -> None:
        self.runtime, self.device, self.profile, self.forwards = runtime, device, profile, list(forwards)

    def __enter__(self) -> Self:
        sync(self.device)
        self.runtime.reset_stats()
        self.runtime.plan_log = []
        self.before = {k: v for k, v in self.runtime.cache.counters().items() if k != "per_layer"}
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        stats = self.runtime.stats()
        cache = stats["cache"]
        hits, misses = (cache[k] - self.before[k] for k in ("hits", "misses"))
        self.figures = {"measured_s": self.seconds, "busy_s": stats["busy_seconds"],
                        "predicted_moe_s": sum(stats["predicted_seconds"].values()),
                        "moe_layer_calls": sum(stats["layer_calls"].values()),
                        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                        "bytes_copied": cache["bytes_copied"] - self.before["bytes_copied"],
                        "cache_slots": cache["slots"], "device": stats["device"], "prefetch": stats["prefetch"]}
        if self.profile is not None:
            self.figures.update(self.profile.figures(self.runtime.plan_log, self.forwards))
        self.runtime.plan_log = None


def run_policy(model, policy: str, args: argparse.Namespace, routing: TraceRouting,
               frequency: dict | None, note: dict, profile: ProfilePrediction | None = None) -> list[dict]:
    device = torch.device(args.device)
    options = RuntimeOptions(policy=policy, cache_ratio=args.cache_ratio, per_layer_cache=args.per_layer_cache,
                             cpu_threads=args.cpu_threads, device=args.device, cost_profile=args.cost_profile)
    runtime = install_runtime(model, options, frequency=frequency)
    install_replay(model, routing, runtime)
    runtime.replay = routing  # prefetch predicts from the replayed trace (as --replay-trace does), not random gates
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    try:
        routing.rewind()
        kv = model.new_kv_cache(16)  # warm-up: kernels, allocator, worker thread
        token = model(prompt(model, 8, device, gen), 0, kv)[-1].argmax().view(1)
        model(token, 8, kv)
        for tokens in [int(t) for t in args.prompt_tokens.split(",") if t]:
            routing.rewind()
            ids, kv = prompt(model, tokens, device, gen), model.new_kv_cache(tokens + 1)
            with Meter(runtime, device, profile, [(tokens, 0)]) as m:
                model(ids, 0, kv)
            rows.append({"policy": policy, "phase": "prefill", "tokens": tokens, **m.figures, **note})
        routing.rewind()
        first = 16
        kv = model.new_kv_cache(first + args.decode_tokens + 1)
        token = model(prompt(model, first, device, gen), 0, kv)[-1].argmax().view(1)
        steps = [(1, pos) for pos in range(first, first + args.decode_tokens)]
        with Meter(runtime, device, profile, steps) as m:
            for pos in range(first, first + args.decode_tokens):
                token = model(token, pos, kv)[-1].argmax().view(1)
        rows.append({"policy": policy, "phase": "decode", "tokens": args.decode_tokens, **m.figures,
                     "tokens_per_second": args.decode_tokens / m.seconds, **note})
    finally:
        runtime.close()
        del runtime
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    unknown = [p for p in args.policies.split(",") if p not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(PRESETS)}")
    torch.manual_seed(args.seed)
    config, hf_config = load_config(args)
    pin = args.device.startswith("cuda")
    log.info("building random %s weights (%s): %d MoE layers x %d experts", args.model, args.dtype,
             len(config.moe_layers), config.num_experts)
    start = time.perf_counter()
    model = build_model(config, args.dtype, args.seed, pin, args.expert_dtype).to(args.device)
    log.info("model built in %.1f s", time.perf_counter() - start)
    replay, hot, trace_name = traces_for(args)
    routing = TraceRouting(replay, config.moe_layers, config.num_experts, name=trace_name)
    frequency = TraceRouting(hot, config.moe_layers, config.num_experts).frequency() if hot else None
    note = {"model": args.model, "dtype": args.dtype, "expert_format": model.expert_store.format.describe(), "cache_ratio": args.cache_ratio, "trace": trace_name,
            "trace_top_k": routing.k, "model_top_k": config.top_k, "gpu_name":
            torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "none (CPU fallback)"}
    profile = None
    if args.predict_profile:
        store = model.expert_store
        profile = ProfilePrediction(args.predict_profile, hf_config, store,
                                    8.0 * store.expert_nbytes / (3 * store.hidden * store.intermediate))
    rows = []
    out = args.out or (os.path.join(os.environ["OUT"], "bench_policies_gpu.json") if os.environ.get("OUT") else None)
    for policy in args.policies.split(","):
        for r in run_policy(model, policy, args, routing, frequency, note, profile):
            print(json.dumps(r), flush=True)
            rows.append(r)
        if out:  # after every policy: a run stopped by a timeout keeps the rows so far
            Path(out).write_text(json.dumps(rows, indent=1))
            log.info("wrote %d rows to %s", len(rows), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
