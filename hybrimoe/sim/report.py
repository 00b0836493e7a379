"""Markdown tables of a `hybrimoe bench` result (what docs/BENCH.md shows)."""

from __future__ import annotations

from hybrimoe.sim.batch_bench import batch_markdown
from hybrimoe.sim.bench import BASELINE, _speedup, bound_share
from hybrimoe.sim.runner import BOUND


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _cell(row: dict, key: str, speedup: float) -> str:
    """`time ms (speedup, share of the row's own bound speedup)`; a `bound` row has no share."""
    if row["policy"] == BOUND or row.get("bound_" + key) is None:
        return f"{_ms(row[key])} ({speedup:.2f}x)"
    return f"{_ms(row[key])} ({speedup:.2f}x, {bound_share(row, key):.0%})"


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    cfg = doc["config"]
    tuned = doc.get("tuned", {})
    scale = doc.get("cpu_rate_scale", 1.0)
    cpu = "" if scale == 1.0 else f" with its CPU {scale:g}x slower (--cpu-rate-scale {scale:g})"
    lines = [f"Simulated with cost profile `{doc['profile']}`{cpu} on the packaged eval traces (not measured); "
             f"MRS alpha {tuned.get('mrs_alpha', 0.5)}, prefetch look-ahead L = {tuned.get('horizon', 3)} "
             "(chosen on dev traces); prefetch predictor accuracy 0.8 unless stated.", ""]
    lines += ["### Mean speedup over kTransformers", "",
              "`bound` = the lower bound (`hybrimoe/sim/bound.py`) for the cache content `hybrimoe` "
              "held: no schedule with that cache content is faster. \"of bound\" = the fraction of its own "
              "bound's speedup a policy reaches (its bound's time / its time, mean over rows), each policy "
              "against the bound for the cache content IT held.", "",
              "| policy | prefill (TTFT) | decode (TBT) | prefill, of bound | decode, of bound |",
              "|---|---|---|---|---|"]
    for policy, s in doc["summary"].items():
        shares = ("- | -" if policy == BOUND else
                  f"{s['prefill_bound_share']:.0%} | {s['decode_bound_share']:.0%}")
        lines.append(f"| {policy} | {s['prefill_speedup']:.2f}x | {s['decode_speedup']:.2f}x | {shares} |")
    prompts = cfg["prompts"]
    lines += ["", "### TTFT and TBT per model and cache ratio", "",
              "ms (speedup over kTransformers; fraction of the row's own bound speedup reached = bound / time). "
              "The `bound` rows are the bound for `hybrimoe`'s cache content.", "",
              "| model | cache | policy | " + " | ".join(f"TTFT {n}" for n in prompts) + " | TBT |",
              "|---" * (4 + len(prompts)) + "|"]
    policies = {r["policy"] for r in rows if r["block"] == "main"}
    pre = {(r["model"], r["cache_ratio"], r["policy"], r["prompt_tokens"]): s
           for p in policies for r, s in _speedup(rows, p, "prefill", "ttft_seconds")}
    dec = {(r["model"], r["cache_ratio"], r["policy"]): s
           for p in policies for r, s in _speedup(rows, p, "decode", "tbt_seconds")}
    for r in rows:
        if r["block"] != "main" or r["phase"] != "decode":
            continue
        key = (r["model"], r["cache_ratio"], r["policy"])
        cells = []
        for n in prompts:
            p = next(x for x in rows if x["block"] == "main" and x["phase"] == "prefill" and
                     (x["model"], x["cache_ratio"], x["policy"], x["prompt_tokens"]) == key + (n,))
            cells.append(_cell(p, "ttft_seconds", pre[key + (n,)]))
        lines.append(f"| {r['model']} | {r['cache_ratio']:g} | {r['policy']} | " + " | ".join(cells)
                     + f" | {_cell(r, 'tbt_seconds', dec[key])} |")
    wrapped = sorted({(r["model"], r["prompt_tokens"]) for r in rows if r.get("prompt_wrapped")})
    if wrapped:
        lines += ["", "Prompts longer than the trace cycle its tokens: " +
                  ", ".join(f"{m} {n}" for m, n in wrapped) + "."]
    lines += ["", f"### Ablation (cache {min(cfg['ratios']):g}; prefill of {cfg['ablation_prompt']} tokens)", "",
              "| model | policy | TTFT ms | speedup | TBT ms | speedup |", "|---|---|---|---|---|---|"]
    abl = [r for r in rows if r["block"] == "ablation"]
    for r in abl:
        if r["phase"] != "prefill":
            continue
        d = next(x for x in abl if x["phase"] == "decode" and (x["model"], x["policy"]) == (r["model"], r["policy"]))
        bp = next(x for x in abl if x["phase"] == "prefill" and (x["model"], x["policy"]) == (r["model"], BASELINE))
        bd = next(x for x in abl if x["phase"] == "decode" and (x["model"], x["policy"]) == (r["model"], BASELINE))
        lines.append(f"| {r['model']} | {r['policy']} | {_ms(r['ttft_seconds'])} | "
                     f"{bp['ttft_seconds'] / r['ttft_seconds']:.2f}x | {_ms(d['tbt_seconds'])} | "
                     f"{bd['tbt_seconds'] / d['tbt_seconds']:.2f}x |")
    lines += ["", "### Decode hit rate, MRS vs LRU (kTransformers scheduling, misses filled in link idle time)", "",
              "| model | cache | MRS | LRU |", "|---|---|---|---|"]
    cache = [r for r in rows if r["block"] == "cache"]
    for r in cache:
        if r["cache"] == "mrs":
            lru = next(x for x in cache if x["cache"] == "lru" and (x["model"], x["cache_ratio"]) ==
                       (r["model"], r["cache_ratio"]))
            lines.append(f"| {r['model']} | {r['cache_ratio']:g} | {r['decode_hit_rate']:.3f} | "
                         f"{lru['decode_hit_rate']:.3f} |")
    lines += ["", f"### Prefetching (HybriMoE decode, cache {min(cfg['ratios']):g})", "",
              "| model | predictor | TBT ms | prefetched experts | used before eviction |", "|---|---|---|---|---|"]
    for r in rows:
        if r["block"] == "prefetch":
            used = f"{r['prefetch_useful'] / r['prefetch_copies']:.0%}" if r["prefetch_copies"] else "-"
            lines.append(f"| {r['model']} | {r['variant']} | {_ms(r['tbt_seconds'])} | {r['prefetch_copies']} "
                         f"| {used} |")
    batch = batch_markdown(doc)
    return "\n".join(lines) + "\n" + ("\n" + batch if batch else "")
