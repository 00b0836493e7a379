"""`hybrimoe bench`'s batched-decode block: decode of B sequences together (continuous batching),
simulated at each batch size of `BenchConfig.batches` for every policy and cache ratio.

Per (model, cache ratio, policy, batch B): every eval trace of the model decoded at batch B
(hybrimoe.sim.prompt: lanes are windows of the trace's decode stream; `BenchConfig.batch_decode`
steps per trace, each step B tokens), TBT = mean decode step weighted by steps over the traces (the
time between two tokens of each sequence), tokens/s = B / TBT (all sequences together), and the
lower bound of the run's own cache content (`bound_tbt_seconds`, `bound_tokens_per_second`). A
`bound` row per (model, ratio, batch) is the bound of the `hybrimoe` run. The paper measured batch
1 only: every figure here at B > 1 is this simulator's extrapolation, not a reproduction.
"""

from __future__ import annotations

import dataclasses
from statistics import mean

from hybrimoe.sim.runner import BOUND, BOUND_NOTE, BOUND_OF, Setup

BASELINE = "ktransformers"


def batch_block(config, model: str, setups: list[Setup], progress=None) -> list[dict]:
    """Rows of block "batch" for one model (see module doc), bound rows after each (ratio, batch)."""
    from hybrimoe.sim.bench import _decode

    short = dataclasses.replace(config, max_decode=config.batch_decode)  # decode steps per trace
    rows: list[dict] = []
    for ratio in config.ratios:
        for batch in config.batches:
            here = []
            for policy in config.policies:
                d = _decode(setups, policy, ratio, short, batch=batch)
                here.append({"block": "batch", "phase": "decode", "model": model, "policy": policy,
                             "cache_ratio": ratio, "batch": batch, **d,
                             "tokens_per_second": batch / d["tbt_seconds"],
                             "bound_tokens_per_second": batch / d["bound_tbt_seconds"]})
                if progress:
                    progress.tick(f"{model} batch {batch} {policy} cache {ratio}")
            rows += here + [{**r, "policy": BOUND, "tbt_seconds": r["bound_tbt_seconds"],
                             "tokens_per_second": r["bound_tokens_per_second"], "note": BOUND_NOTE}
                            for r in here if r["policy"] == BOUND_OF]
    return rows


def batch_speedups(rows: list[dict]) -> list[tuple[dict, float]]:
    """(row, kTransformers' TBT / the row's TBT) for every batch-block row (same model, ratio, batch)."""
    base = {(r["model"], r["cache_ratio"], r["batch"]): r["tbt_seconds"] for r in rows
            if r["block"] == "batch" and r["policy"] == BASELINE}
    return [(r, base[(r["model"], r["cache_ratio"], r["batch"])] / r["tbt_seconds"]) for r in rows
            if r["block"] == "batch"]


def summarise_batch(rows: list[dict]) -> dict:
    """{policy: {batch: {"decode_speedup": mean over models and ratios, "bound_share": mean own bound /
    TBT}}} (arithmetic means, as the main block's summary)."""
    out: dict = {}
    pairs = batch_speedups(rows)
    for policy in sorted({r["policy"] for r, _ in pairs}):
        out[policy] = {}
        for batch in sorted({r["batch"] for r, _ in pairs}):
            mine = [(r, s) for r, s in pairs if r["policy"] == policy and r["batch"] == batch]
            out[policy][batch] = {"decode_speedup": mean(s for _, s in mine),
                                  "bound_share": mean(r["bound_tbt_seconds"] / r["tbt_seconds"] for r, _ in mine)}
    return out


def batch_markdown(doc: dict) -> str:
    """The batched-decode tables of a bench document ("" when it has no batch rows)."""
    rows = [r for r in doc["rows"] if r["block"] == "batch"]
    if not rows:
        return ""
    cfg = doc["config"]
    batches = sorted({r["batch"] for r in rows})
    cols = " | ".join(f"B={b}" for b in batches)
    lines = ["### Batched decode (simulated)", "",
             f"The paper measured batch 1 only; batch > 1 is this simulator's extrapolation. Each decode step "
             f"carries one token of each of B sequences (windows of each eval trace's decode stream, "
             f"{cfg['batch_decode']} steps per trace); TBT = the step (time between two tokens of a sequence), "
             "tokens/s = B / TBT. Prefill is not part of this table. kTransformers' decode is priced under "
             "CUDA graphs at every batch; llama.cpp keeps CPU layers' experts on the CPU below 32 tokens per op.",
             "", "Mean decode speedup over kTransformers at the same cache ratio and batch (mean over models and "
             "cache ratios; in brackets the fraction of its own bound's speedup reached, bound / TBT):", "",
             f"| policy | {cols} |", "|---" * (1 + len(batches)) + "|"]
    for policy, per in summarise_batch(rows).items():
        cells = [f"{per[b]['decode_speedup']:.2f}x" + ("" if policy == BOUND else f" ({per[b]['bound_share']:.0%})")
                 for b in batches]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    lines += ["", "Aggregate decode tokens/s (speedup over kTransformers; fraction of the row's own bound speedup "
              "reached). The `bound` rows are the bound for `hybrimoe`'s cache content.", "",
              f"| model | cache | policy | {cols} |", "|---" * (3 + len(batches)) + "|"]
    speed = {(r["model"], r["cache_ratio"], r["policy"], r["batch"]): (r, s) for r, s in batch_speedups(rows)}
    seen = []
    for r in rows:
        key = (r["model"], r["cache_ratio"], r["policy"])
        if key in seen:
            continue
        seen.append(key)
        cells = []
        for b in batches:
            row, s = speed[key + (b,)]
            share = "" if r["policy"] == BOUND else f", {row['bound_tbt_seconds'] / row['tbt_seconds']:.0%}"
            cells.append(f"{row['tokens_per_second']:.1f} ({s:.2f}x{share})")
        lines.append(f"| {r['model']} | {r['cache_ratio']:g} | {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
