"""A/B of the CPU decode overhead cuts, each against the code before it, in interleaved rounds.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ab_decode_cpu.py --threads 1 --dense-dtype int4

Model: benchmarks/bench_vs_llamacpp.py's (random Mixtral-shaped, int4 g32 experts, dense as given),
plain engine. Each variant undoes ONE change by patching it back to the previous code:
  base               everything as committed
  half_bmm           attention's matmuls in bf16 again (oneDNN builds a kernel per new shape), over a
                     bf16 KV cache as then
  grouped_executor   the one-token decode goes through group_by_expert again
  views_rebuilt      every expert view is rebuilt from its buffer on each call again
Prints per variant the median ms per decode token over --rounds rounds, its ratio to base's, and the
median of the per-round ratios (each variant against base in the same round: the robust figure on a
shared machine) as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode_cpu import _bench_module, build_model, decode  # noqa: E402


def _half_causal_attention(q, k, v, scale, sliding_window=None):
    """causal_attention as before the fp32 change: the matmuls in the inputs' dtype."""
    hq, t, dk = q.shape
    hkv, s, _ = k.shape
    g = hq // hkv
    q_pos = torch.arange(s - t, s, device=q.device)[:, None]
    k_pos = torch.arange(s, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    qg = q.reshape(hkv, g * t, dk)
    scores = torch.matmul(qg, k.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed.repeat(g, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)
    return out.view(hq, t, -1).transpose(0, 1).reshape(t, -1)


def variant(name: str):
    from hybrimoe.moe.layer import ReferenceExecutor
    from hybrimoe.moe.store import ExpertStore

    if name == "half_bmm":  # the cache in the model's dtype too, as it was then (it is fp32 on the CPU now)
        stack = contextlib.ExitStack()
        stack.enter_context(patch("hybrimoe.models.attention.causal_attention", _half_causal_attention))
        stack.enter_context(patch("hybrimoe.models.attention.gqa_cache_dtype", lambda dtype, device: dtype))
        return stack
    if name == "grouped_executor":
        return patch.object(ReferenceExecutor, "run", ReferenceExecutor.run_grouped)  # the general path for 1 token too
    if name == "views_rebuilt":
        return patch.object(ExpertStore, "expert", lambda self, layer, e: self.layout.view(self.buffer(layer, e)))
    return contextlib.nullcontext()


def main() -> None:
    bench = _bench_module()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="base,half_bmm,grouped_executor,views_rebuilt")
    parser.add_argument("--fresh-shapes", action="store_true",
                        help="a longer prompt in every round, so attention sees new lengths (as a real decode does; "
                             "repeated lengths hit oneDNN's kernel cache)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(bench, args)
    prompt = torch.randint(259, args.vocab, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    names = args.variants.split(",")
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up
        with variant(name):
            decode(model, prompt, 4)
    step = 0
    for _ in range(args.rounds):
        for name in names:
            step += 1
            longer = prompt + [259 + (i % 100) for i in range(args.new_tokens * step)] if args.fresh_shapes else prompt
            with variant(name):
                times[name].append(statistics.median(decode(model, longer, args.new_tokens)))
    base = statistics.median(times[names[0]])
    for name in names:
        ms = statistics.median(times[name])
        paired = [t / b for t, b in zip(times[name], times[names[0]])]  # same round: same machine state
        print(json.dumps({"kind": "ab", "variant": name, "ms_per_token": round(ms * 1e3, 2),
                          "vs_base": round(ms / base, 3),
                          "vs_base_per_round_median": round(statistics.median(paired), 3), "runs_ms": [round(t * 1e3, 2) for t in times[name]],
                          "threads": args.threads, "dense_dtype": args.dense_dtype, "load": os.getloadavg(),
                          "torch": torch.__version__, "measured": True}))


if __name__ == "__main__":
    main()
