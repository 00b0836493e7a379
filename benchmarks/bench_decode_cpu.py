"""CPU decode speed: hybrimoe's Engine vs transformers' `generate` on the same checkpoint.

Prints one JSON row per implementation: decode tokens/s, ms per token, the weight bytes one decode
token reads (dense weights + the top-k activated routed experts of every MoE layer; the embedding
table counts one row; KV-cache reads are not counted) and achieved bandwidth = bytes / time per token.
Decode time excludes prefill: ours from the engine's timers, transformers' as
(t[N new tokens] - t[1 new token]) / (N - 1). EOS is ignored so both decode exactly N tokens.

    .venv/bin/python benchmarks/bench_decode_cpu.py                # makes a bigger tiny Mixtral (bf16)
    .venv/bin/python benchmarks/bench_decode_cpu.py --model DIR --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model(out: Path, args: argparse.Namespace) -> Path:
    """A Mixtral-shaped random checkpoint of the requested size (fp32 on disk; loaded as --dtype)."""
    from hybrimoe.tiny import make_tiny

    heads = args.hidden // 64
    make_tiny("mixtral", out, layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
              seed=args.seed, overrides={"intermediate_size": args.expert_intermediate, "num_attention_heads": heads,
                                         "num_key_value_heads": max(1, heads // 4), "head_dim": 64,
                                         "sliding_window": None, "initializer_range": 0.02})
    return out


def weight_bytes_per_token(model) -> int:
    """Dense parameter bytes (embedding: one row) + top_k activated experts of every MoE layer."""
    cfg = model.config
    params = {id(p): p for p in model.parameters()}.values()
    dense = sum(p.numel() * p.element_size() for p in params)
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight is not embed:
        dense -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    experts = len(cfg.moe_layers) * cfg.top_k * model.expert_store.expert_nbytes  # in the experts' own format
    return dense + experts


def row(impl: str, name: str, args: argparse.Namespace, seconds_per_token: float, bytes_per_token: int,
        **extra: object) -> dict:
    return {"impl": impl, "model": name, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "decode_tokens_per_second": round(1.0 / seconds_per_token, 2),
            "ms_per_token": round(seconds_per_token * 1e3, 3), "weight_bytes_per_token": bytes_per_token,
            "achieved_GBps": round(bytes_per_token / seconds_per_token / 1e9, 3), **extra}


def bench_ours(model_dir: Path, prompt: list[int], args: argparse.Namespace) -> tuple[dict, list[int]]:
    from hybrimoe.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(model_dir, dtype=args.dtype, expert_dtype=args.expert_dtype)
    engine.eos_token_ids = set()  # decode exactly new_tokens
    params = SamplingParams(max_new_tokens=args.new_tokens)
    engine.generate(prompt, SamplingParams(max_new_tokens=4))  # warm-up
    runs = [engine.generate(prompt, params) for _ in range(args.repeats)]
    per_token = statistics.median(r.decode_seconds / (r.completion_tokens - 1) for r in runs)
    prefill = statistics.median(r.prefill_seconds for r in runs)
    return row("hybrimoe", engine.model_name, args, per_token, weight_bytes_per_token(engine.model),
               prefill_seconds=round(prefill, 4), expert_dtype=engine.model.expert_store.format.describe(),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)")), runs[0].token_ids


def bench_transformers(model_dir: Path, prompt: list[int], args: argparse.Namespace,
                       bytes_per_token: int) -> tuple[dict, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[args.dtype]).eval()
    ids = torch.tensor([prompt])

    def timed(n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                 pad_token_id=0)
        return time.perf_counter() - start, out[0, len(prompt):].tolist()

    timed(4)  # warm-up
    one = statistics.median(timed(1)[0] for _ in range(args.repeats))
    full = [timed(args.new_tokens) for _ in range(args.repeats)]
    per_token = (statistics.median(t for t, _ in full) - one) / (args.new_tokens - 1)
    return row("transformers", model_dir.name, args, per_token, bytes_per_token,
               prefill_seconds=round(one, 4)), full[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: make one, see below)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--expert-dtype", default=None, help="our routed experts: bf16, int8, int4 (default --dtype)")
    parser.add_argument("--only-ours", action="store_true", help="skip transformers")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--expert-intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        model_dir = args.model or make_model(Path(tmp) / "mixtral-h1024-e8-k2-l4", args)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(args.seed))
        ours, our_tokens = bench_ours(model_dir, prompt.tolist(), args)
        if args.only_ours:
            print(json.dumps(ours))
            return
        theirs, their_tokens = bench_transformers(model_dir, prompt.tolist(), args, ours["weight_bytes_per_token"])
        agree = next((i for i, (a, b) in enumerate(zip(our_tokens, their_tokens)) if a != b), len(our_tokens))
        ours["greedy_tokens_equal_to_transformers"] = agree
        for r in (ours, theirs):
            print(json.dumps(r))


if __name__ == "__main__":
    main()
