"""Bounded loopback load test of `hybrimoe serve`: a burst of concurrent requests, with and without a
queue bound, reporting accepted / rejected requests, p50 / p95 latency and the server's RSS.

The script starts the server itself on 127.0.0.1 (port chosen by the OS) and talks to nothing else.
Bounded: at most --requests requests per scenario (<= 1000) and --time-limit seconds per scenario;
whatever is unfinished then is cancelled and counted as "unfinished". Writes one JSON document.

    .venv/bin/python benchmarks/load_test_server.py                       # tiny qwen3-moe made on the fly
    .venv/bin/python benchmarks/load_test_server.py --model DIR --requests 200 --max-queue 16,100000 \
        --out benchmarks/load_test_server.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import tempfile
import time
from pathlib import Path

import httpx
from machine import cpu_model, start_server  # benchmarks/machine.py

MAX_REQUESTS = 1000




def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")




async def post_raw(host: str, port: int, body: bytes) -> dict:
    """One POST on its own connection with asyncio streams (a light client: the load generator must not
    be the bottleneck on a small machine); status, seconds, Retry-After."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    response = await reader.read()  # until the server closes (Connection: close)
    writer.close()
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return {"status": int(head[0].split()[1]), "seconds": time.perf_counter() - start,
            "retry_after": headers.get("retry-after")}


async def burst(url: str, model: str, n: int, max_tokens: int, time_limit: float) -> list[dict]:
    """n requests sent at once; each: status, seconds (status None if unfinished at the time limit)."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps({"model": model, "prompt": f"Request {i}: the quick brown fox", "max_tokens": max_tokens,
                          "temperature": 0}).encode() for i in range(n)]
    tasks = [asyncio.ensure_future(post_raw(host, int(port), body)) for body in bodies]
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    return [t.result() if t in done and not t.exception() else {"status": None, "seconds": None}
            for t in tasks]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def scenario(model: Path, name: str, args: argparse.Namespace, max_queue: int, workdir: Path) -> dict:
    proc, url = start_server(model, workdir / f"serve-{max_queue}.log",
                                 ["--max-queue", str(max_queue), "--threads", str(args.threads)], timeout=180)
    try:
        for _ in range(3):  # warm-up
            httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": name, "prompt": "warm up", "max_tokens": args.max_tokens})
        rss_before = rss_mb(proc.pid)
        start = time.perf_counter()
        results = asyncio.run(burst(url, name, args.requests, args.max_tokens, args.time_limit))
        wall = time.perf_counter() - start
        rss_after = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    ok = [r["seconds"] for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"max_queue": max_queue, "requests": args.requests, "accepted": len(ok), "rejected_429": len(refused),
            "unfinished": statuses.get("None", 0), "statuses": statuses,
            "accepted_latency_p50_s": percentile(ok, 0.5), "accepted_latency_p95_s": percentile(ok, 0.95),
            "accepted_latency_max_s": percentile(ok, 1.0),
            "rejected_latency_p95_s": percentile([r["seconds"] for r in refused], 0.95),
            "retry_after_s": sorted({int(r["retry_after"]) for r in refused if r["retry_after"]}),
            "wall_seconds": round(wall, 2), "accepted_per_second": round(len(ok) / wall, 2),
            "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_after, 1),
            "server_exit_code_after_sigterm": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a tiny qwen3-moe)")
    parser.add_argument("--requests", type=int, default=200, help=f"requests per burst (<= {MAX_REQUESTS})")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-queue", default="16,100000", help="comma-separated --max-queue values to compare")
    parser.add_argument("--threads", type=int, default=1, help="serve --threads")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per burst, then cancel")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON document here too")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be in 1..{MAX_REQUESTS}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            from hybrimoe.tiny import make_tiny

            model = Path(make_tiny("qwen3-moe", workdir / "tiny-qwen3-moe",
                                   overrides={"max_position_embeddings": 4096}))
        name = model.resolve().name
        load_before = os.getloadavg()
        rows = [scenario(model, name, args, int(q), workdir) for q in args.max_queue.split(",")]
        load_after = os.getloadavg()
    doc = {"what": "measured: burst of concurrent /v1/completions to `hybrimoe serve` on loopback",
           "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in load_after]},
           "model": "tiny qwen3-moe (hybrimoe make-tiny, context 4096)" if args.model is None else str(args.model),
           "max_tokens": args.max_tokens, "threads": args.threads,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "scenarios": rows}
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
