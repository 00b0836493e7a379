"""Server throughput with continuous batching: aggregate tokens/s of `hybrimoe serve --max-batch 8`
at 1, 4 and 8 concurrent streams, against the same requests served one at a time (`--max-batch 1`).

Both servers run at once on loopback (a Mixtral-shaped checkpoint made on the fly, fp32, plain engine,
--threads 1 each); the rounds interleave the two servers and the concurrency levels, so that load
from other jobs on the machine hits both alike. Every request: a different ~20-token prompt, greedy,
exactly --new-tokens tokens (EOS suppressed with logit_bias), streamed. A benchmark, not a test:
one JSON row per (server, concurrency) with the medians over the rounds.

    aggregate_tokens_per_second  completion tokens of all streams / seconds from the first request
                                 sent to the last stream ended (prompts of ~20 tokens: decode dominates)
    ttft_mean_seconds            mean time to first token of the streams (one at a time, the later
                                 streams wait for the earlier ones to finish)

    .venv/bin/python benchmarks/bench_server_batching.py --out benchmarks/results/server_batching.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from machine import cpu_model, start_server  # benchmarks/machine.py

WORDS = "experts route every token to a few of many while the card holds the hot ones and the processor".split()






def prompt(i: int) -> str:
    return f"Request {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12 + i % 5))


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> tuple[float, float, int]:
    """(first token at, ended at, completion tokens), seconds after t0."""
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), time.perf_counter() - t0, tokens


async def scenario(url: str, model: str, streams: int, new_tokens: int, eos: list[int]) -> dict:
    bodies = [{"model": model, "prompt": prompt(i), "max_tokens": new_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, "logit_bias": {str(e): -100 for e in eos}}
              for i in range(streams)]
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, b, t0) for b in bodies))
    wall = max(end for _, end, _ in results)
    tokens = sum(n for _, _, n in results)
    assert tokens == streams * new_tokens, (tokens, streams, new_tokens)
    return {"seconds": wall, "aggregate_tokens_per_second": tokens / wall,
            "ttft_mean_seconds": statistics.fmean(first for first, _, _ in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Mixtral-shaped model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="--threads of each server")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON rows to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    max_batch = max(levels)
    import torch
    from transformers import AutoTokenizer

    from hybrimoe.config import ModelConfig
    from hybrimoe.tiny import SPECIAL_TOKENS, make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "mixtral-small"
        make_tiny("mixtral", model_dir, layers=args.layers, experts=args.experts, top_k=args.top_k,
                  hidden=args.hidden, overrides={"max_position_embeddings": 512})
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # every id that would end a stream early
        eos = sorted({int(i) for i in ModelConfig.from_pretrained(model_dir).eos_token_ids} |
                     {int(tokenizer.eos_token_id)} | {int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS})
        servers = {}
        try:
            for batch in (1, max_batch):
                servers[batch] = start_server(model_dir, Path(tmp) / f"serve-{batch}.log",
                                                   ["--threads", str(args.threads), "--max-batch", str(batch)],
                                                   env={"OMP_NUM_THREADS": str(args.threads)})
            for batch, (_, url) in servers.items():  # warm-up: first requests pay for lazy init
                asyncio.run(scenario(url, model_dir.name, 2, 4, eos))
            samples: dict[tuple[int, int], list[dict]] = {}
            for _ in range(args.rounds):
                for streams in levels:
                    for batch, (_, url) in servers.items():
                        row = asyncio.run(scenario(url, model_dir.name, streams, args.new_tokens, eos))
                        samples.setdefault((batch, streams), []).append(row)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
               "torch": torch.__version__, "python": platform.python_version()}
    rows = []
    for (batch, streams), runs in sorted(samples.items()):
        row = {"bench": "server_batching", "max_batch": batch, "concurrent_streams": streams,
               "model": f"mixtral-shaped random fp32: hidden {args.hidden}, {args.layers} layers, "
                        f"{args.experts} experts top-{args.top_k}",
               "new_tokens_per_stream": args.new_tokens, "server_threads": args.threads, "rounds": len(runs)}
        for key in ("aggregate_tokens_per_second", "ttft_mean_seconds", "seconds"):
            row[key] = statistics.median(r[key] for r in runs)
        serial = samples[(1, streams)]
        row["speedup_over_one_at_a_time"] = row["aggregate_tokens_per_second"] / \
            statistics.median(r["aggregate_tokens_per_second"] for r in serial)
        rows.append({**row, **machine, "measured": True})
    for row in rows:
        print(json.dumps(row))
    if args.out is not None:
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
