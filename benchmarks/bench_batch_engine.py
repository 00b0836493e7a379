"""Engine-level continuous batching on this machine's CPU (measured, not simulated): N requests served
one at a time (`Engine.generate` in a row) against `BatchEngine` with max_batch B (all submitted at
once), same prompts and greedy tokens.

Model: random weights in a Mixtral shape scaled down (hidden 512, 8 experts of 1024, top-2, 4 layers,
GQA 4/2 heads, vocab 4096, fp32), plain engine (no hybrid runtime: no GPU here). Each request: a
32-token prompt, 32 new tokens (EOS suppressed by logit_bias). Rounds interleave batch 1 (sequential)
and the batch sizes; one JSON row per (round, B) with wall seconds and aggregate tokens/s (completion
tokens of all requests / wall seconds, prefill included), the CPU model and the load average.

    .venv/bin/python benchmarks/bench_batch_engine.py --out benchmarks/results/batch_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from hybrimoe.config import ModelConfig
from hybrimoe.engine import BatchEngine, Engine, SamplingParams
from hybrimoe.loader import build_dummy_model
from hybrimoe.tiny import tiny_config
from machine import cpu_model  # benchmarks/machine.py




def make_engine() -> Engine:
    raw = tiny_config("mixtral", 4096, [0], layers=4, experts=8, top_k=2, hidden=512,
                      overrides={"intermediate_size": 1024})
    model = build_dummy_model(ModelConfig.from_dict(raw.to_dict()), "fp32", seed=0, std=0.05)
    return Engine(model.eval(), None, "mixtral-shaped-small")


def serve(engine: Engine, prompts: list[list[int]], params: SamplingParams, batch: int) -> tuple[float, int]:
    """(wall seconds, completion tokens) for all prompts: one at a time (batch 1) or a BatchEngine."""
    start = time.perf_counter()
    tokens = 0
    if batch == 1:
        for p in prompts:
            tokens += engine.generate(p, params).completion_tokens
    else:
        b = BatchEngine(engine, max_batch=batch)
        for p in prompts:
            b.submit(p, params)
        while b.has_work():
            for event in b.step():
                assert event.error is None, event.error
                if event.chunk.result is not None:
                    tokens += event.chunk.result.completion_tokens
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = make_engine()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 4096, (32,), generator=gen).tolist() for _ in range(args.requests)]
    params = SamplingParams(max_new_tokens=32, logit_bias={0: -100.0})
    batches = [int(b) for b in args.batches.split(",")]
    serve(engine, prompts[:2], params, 2)  # warm-up
    rows = []
    for r in range(args.rounds):
        for b in (batches if r % 2 == 0 else batches[::-1]):
            seconds, tokens = serve(engine, prompts, params, b)
            rows.append({"measured": "engine on CPU", "cpu": cpu_model(), "threads": args.threads,
                         "load_avg_1m": os.getloadavg()[0], "round": r, "max_batch": b,
                         "requests": args.requests, "completion_tokens": tokens, "wall_seconds": round(seconds, 4),
                         "tokens_per_second": round(tokens / seconds, 2)})
            print(json.dumps(rows[-1]))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
