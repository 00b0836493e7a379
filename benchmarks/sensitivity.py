"""How the bench's headline speedups depend on two assumptions of the cost model (simulated).

Variants of the main block of `hybrimoe bench` (every eval trace, model, cache ratio 25/50/75% and
prompt of 32-1024 tokens; decode over up to 64 steps per trace; dev-tuned MRS alpha and look-ahead):
1. `paper-a6000` as shipped: kTransformers decodes under CUDA graphs (graph-captured launch costs),
   every other preset eager;
2. the same with the CPU 2.47x slower (`--cpu-rate-scale 2.47`): the rate fitted to the paper's own
   measured kTransformers (benchmarks/fit_cpu_rate.py: Qwen2-57B decode at 0.21 s/token, every
   routed expert on the CPU; a lower bound on the slowdown);
3. `paper-a6000` with kTransformers' decode eager too (the assumption before its CUDA graphs were
   modelled), for reference.
Each variant's full tables: `hybrimoe bench --cpu-rate-scale S --out DIR` (variants 1, 2).
Prints a markdown table (docs/BENCH.md, "Sensitivity") and writes one JSON row per variant to --out.

    .venv/bin/python benchmarks/sensitivity.py --out benchmarks/sensitivity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path
from statistics import mean

from hybrimoe.policy.presets import get_preset
from hybrimoe.sim.bench import TUNED, BenchConfig, _decode, _setups
from hybrimoe.sim.runner import simulate_one

POLICIES = ("hybrimoe", "hybrimoe-sched-only", "fiddler", "gpu-lru", "llamacpp", "resident")
FITTED_SCALE = 2.47  # benchmarks/fit_cpu_rate.py, hit rate 0


def _variant(label: str, scale: float, kt_eager: bool) -> dict:
    config = dataclasses.replace(BenchConfig(), cpu_rate_scale=scale)
    kt = get_preset("ktransformers")
    if kt_eager:
        kt = dataclasses.replace(kt, cuda_graphs=False)
    prefill: dict[str, list[float]] = {p: [] for p in POLICIES}
    decode: dict[str, list[float]] = {p: [] for p in POLICIES}
    per_model: dict[str, float] = {}
    for model, setups in _setups(config).items():
        for ratio in config.ratios:
            base_tbt = _decode(setups, kt, ratio, config)["tbt_seconds"]
            base_ttft = {n: simulate_one(setups[0], kt, ratio, n, 0, **TUNED)[0].ttft_seconds for n in config.prompts}
            for policy in POLICIES:
                tbt = _decode(setups, policy, ratio, config)["tbt_seconds"]
                decode[policy].append(base_tbt / tbt)
                if policy == "hybrimoe" and ratio == min(config.ratios):
                    per_model[model] = base_tbt / tbt
                for n in config.prompts:
                    ttft = simulate_one(setups[0], policy, ratio, n, 0, **TUNED)[0].ttft_seconds
                    prefill[policy].append(base_ttft[n] / ttft)
    return {"variant": label, "cpu_rate_scale": scale, "ktransformers_decode": "eager" if kt_eager else "CUDA graphs",
            "prefill_speedup": {p: mean(v) for p, v in prefill.items()},
            "decode_speedup": {p: mean(v) for p, v in decode.items()},
            "hybrimoe_decode_speedup_at_25pct": per_model, "profile": config.profile, "simulated": True}


def markdown(rows: list[dict]) -> str:
    head = "| policy | " + " | ".join(f"{r['variant']}: prefill / decode" for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for p in POLICIES:
        lines.append(f"| {p} | " + " | ".join(f"{r['prefill_speedup'][p]:.2f}x / {r['decode_speedup'][p]:.2f}x"
                                             for r in rows) + " |")
    for model in rows[0]["hybrimoe_decode_speedup_at_25pct"]:
        lines.append(f"| hybrimoe decode, {model}, cache 25% | " + " | ".join(
            f"{r['hybrimoe_decode_speedup_at_25pct'][model]:.2f}x" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, metavar="JSON", help="write the rows here too")
    args = p.parse_args()
    start = time.perf_counter()
    rows = [_variant("paper-a6000", 1.0, False),
            _variant(f"CPU /{FITTED_SCALE:g} (fitted to the paper's kTransformers)", FITTED_SCALE, False),
            _variant("paper-a6000, kTransformers decode eager", 1.0, True)]
    print(markdown(rows))
    if args.out:
        doc = {"rows": rows, "machine": platform.processor() or platform.machine(),
               "seconds": time.perf_counter() - start, "simulated": True}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
