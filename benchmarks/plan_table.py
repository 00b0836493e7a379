"""`hybrimoe plan` over the docs' grid: 4 models x GPU 12/24/48 GB x host 64/128 GB x 2 profiles.

    .venv/bin/python benchmarks/plan_table.py --out benchmarks/results/plan_table.json > table.md

SIMULATED (cost profiles desktop-4090 and paper-a6000, prompt 512 tokens, 16 decode steps, context 4096,
1 GB GPU reserve, CUDA with a pinned store). Per cell: the recommended row (fastest decode that fits)
and kTransformers' preset (eager, as hybrimoe runs it) in the same format at its largest cache.
Routing: the packaged eval trace where the model has one, else synthetic (labelled). Writes one JSON
object per cell (with the CPU model and load) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from hybrimoe.plan.build import make_plan
from hybrimoe.plan.memory import Machine
from hybrimoe.plan.predict import format_costs
from hybrimoe.plan.recommend import pick
from hybrimoe.plan.target import resolve_target
from hybrimoe.policy.cost import CostModel
from machine import cpu_model  # benchmarks/machine.py

MODELS = ("mixtral-8x7b", "qwen2-57b-a14b", "deepseek-v2-lite", "qwen3.6-35b-a3b")
PROFILES = ("desktop-4090", "paper-a6000")
GPUS = (12, 24, 48)
HOSTS = (64, 128)
POLICIES = ("hybrimoe", "ktransformers", "llamacpp", "resident")




def cell(model: str, profile: CostModel, gpu: int, host: int) -> dict:
    target = resolve_target(model)
    machine = Machine(gpu * 10**9, host * 10**9, 4096)
    t0 = time.perf_counter()
    plan = make_plan(target, machine, lambda m: format_costs(profile, target.shape, m.expert_bytes, "bf16"),
                     profile.name, policies=POLICIES, sweep=False)
    out = {"model": model, "profile": profile.name, "gpu_gb": gpu, "host_gb": host, "simulated": True,
           "seconds": time.perf_counter() - t0, "routing": plan.routing.label if plan.routing else None,
           "synthetic": bool(plan.routing and plan.routing.synthetic), "memory_estimated": target.config is None}
    rec = plan.recommended
    if rec is None:
        out["refused"] = plan.refusal()
        return out
    b, p = rec.budget, rec.prediction
    kt = next((r for r in plan.rows if r.budget.policy == "ktransformers" and r.budget.mem is b.mem and r.prediction), None)
    bf16 = pick([r for r in plan.rows if r.budget.mem.fmt.name == "bf16"])
    why = min((r.budget.reason for r in plan.rows if r.budget.mem.fmt.name == "bf16" and not r.budget.fits), key=len,
              default="")
    out["bf16"] = (f"{bf16.budget.policy} {bf16.prediction.decode_tokens_per_second:.1f}"
                   f"{'' if bf16.budget.mem.pinned else ' (unpinned)'}" if bf16 else why)
    out.update(policy=b.policy, expert_dtype=b.mem.fmt.name, cache_slots=b.slots, cache_ratio=b.ratio,
               gpu_bytes=b.gpu_bytes, host_bytes=b.mem.host_bytes, pinned=b.mem.pinned,
               decode_tokens_per_second=p.decode_tokens_per_second, ttft_seconds=p.ttft_seconds,
               ktransformers_decode_tokens_per_second=kt.prediction.decode_tokens_per_second if kt else None,
               ktransformers_ttft_seconds=kt.prediction.ttft_seconds if kt else None, command=plan.command)
    return out


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| model | profile | GPU | host | recommended | cache | tok/s | TTFT s | kTransformers preset, same format: tok/s, TTFT s | best bf16 (checkpoint weights): tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["model"] + (" (synthetic routing)" if r["synthetic"] else "") + \
            (" (memory estimated, no serve)" if r["memory_estimated"] else "")
        head = f"| {name} | {r['profile']} | {r['gpu_gb']} GB | {r['host_gb']} GB |"
        if "refused" in r:
            lines.append(f"{head} refused: {r['refused'].split(': ', 1)[1]} | | | | | |")
            continue
        kt = "-" if r["ktransformers_decode_tokens_per_second"] is None else \
            f"{r['ktransformers_decode_tokens_per_second']:.1f}, {r['ktransformers_ttft_seconds']:.2f}"
        lines.append(f"{head} {r['policy']}, {r['expert_dtype']}{'' if r['pinned'] else ', --no-pin-memory'} | "
                     f"{r['cache_slots']} ({r['cache_ratio']:.0%}) | {r['decode_tokens_per_second']:.1f} | "
                     f"{r['ttft_seconds']:.2f} | {kt} | {r['bf16']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plan_table.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    meta = {"cpu": cpu_model(), "load_before": os.getloadavg()[0]}
    rows = []
    for profile_name in PROFILES:
        profile = CostModel.load(profile_name)
        for model in MODELS:
            for gpu in GPUS:
                for host in HOSTS:
                    rows.append(cell(model, profile, gpu, host) | meta)
                    logging.warning("%s %s %d/%d GB done", profile_name, model, gpu, host)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
