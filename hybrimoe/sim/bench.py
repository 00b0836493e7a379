"""The paper's comparison, simulated: `hybrimoe bench` on the packaged EVAL traces.

Blocks (each row is also written to bench.json):
1. main: TTFT at several prompt lengths and TBT (mean decode step) for every policy and cache
   ratio, as speedups over kTransformers; every row also carries its computed lower bound for the
   cache content that row's run held (`bound_ttft_seconds` / `bound_tbt_seconds`,
   hybrimoe.sim.bound), and a `bound` row per setting gives the bound of the `hybrimoe` run;
2. ablation at the smallest cache ratio: each HybriMoE technique alone on the kTransformers baseline;
3. caching: decode hit rate of MRS vs LRU (same scheduling, same miss filling);
4. prefetching: HybriMoE decode with predictor accuracies, a dev-trained cross-layer predictor,
   and no prefetch;
5. batched decode (hybrimoe.sim.batch_bench): TBT and tokens/s of every policy and cache ratio at
   batch 1, 4 and 16 (B sequences per decode step), with the bound (`run_bench(..., only_batch=True)`
   runs this block alone).
Every number is simulated with a cost profile (paper-a6000 by default), not measured. Parameters
(MRS alpha, look-ahead L) are the defaults chosen on DEV traces by benchmarks/tune_on_dev.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from hybrimoe.data import packaged_traces
from hybrimoe.policy.predictor import CrossLayerStats
from hybrimoe.policy.presets import get_preset
from hybrimoe.sim.runner import BOUND, BOUND_NOTE, BOUND_OF, Setup, make_setup, simulate_one
from hybrimoe.trace.format import RoutingTrace

log = logging.getLogger(__name__)
BASELINE = "ktransformers"
# Chosen on DEV traces by benchmarks/tune_on_dev.py (benchmarks/tune_on_dev.json): MRS alpha from
# {0.1, 0.3, 0.5, 0.7, 0.9} by decode hit rate, look-ahead L from {1, 2, 3, 4} by relative TBT.
TUNED = {"mrs_alpha": 0.1, "horizon": 6}
ABLATION = ("ktransformers", "hybrimoe-sched-only", "hybrimoe-prefetch-only", "hybrimoe-cache-only", "hybrimoe")


@dataclass(frozen=True)
class BenchConfig:
    # `bound` rows are added from the `hybrimoe` runs (no simulation of their own)
    policies: tuple[str, ...] = ("hybrimoe", "ktransformers", "llamacpp", "gpu-lru", "fiddler", "hybrimoe-oracle")
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    prompts: tuple[int, ...] = (32, 128, 512, 1024)
    max_decode: int = 64  # decode steps per eval trace
    accuracies: tuple[float, ...] = (0.5, 0.8, 1.0)
    models: tuple[str, ...] | None = None  # None: every model with eval traces
    traces_per_model: int | None = None  # None: all eval traces of a model
    ablation_prompt: int = 128
    batches: tuple[int, ...] = (1, 4, 16)  # batched-decode block: sequences per decode step
    batch_decode: int = 16  # batched-decode block: decode steps per eval trace (each of `batch` tokens)
    profile: str = "paper-a6000"
    cpu_rate_scale: float = 1.0  # the profile's CPU this many times slower (sensitivity; docs/BENCH.md)

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(policies=("hybrimoe", "ktransformers", "llamacpp", "gpu-lru", "fiddler"), ratios=(0.25,),
                   prompts=(32,), max_decode=6, accuracies=(0.5, 1.0), models=("qwen1.5-moe-a2.7b",),
                   traces_per_model=1, ablation_prompt=32, batches=(1, 4), batch_decode=4)


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def tick(self, what: str) -> None:
        self.done += 1
        log.info("[%d/%d %5.1fs] %s", self.done, self.total, time.perf_counter() - self.start, what)


def _setups(config: BenchConfig) -> dict[str, list[Setup]]:
    by_model: dict[str, list[Setup]] = {}
    for t in packaged_traces(role="eval"):
        if config.models is not None and t.model not in config.models:
            continue
        if config.traces_per_model is not None and len(by_model.get(t.model, [])) >= config.traces_per_model:
            continue
        setup = make_setup(RoutingTrace.load(t.path), t.path.name.split(".")[0], t.model, config.profile, t.path,
                           config.cpu_rate_scale)
        by_model.setdefault(t.model, []).append(setup)
    return by_model


def _decode(setups: list[Setup], policy, ratio: float, config: BenchConfig, **kw) -> dict:
    """Decode over every eval trace of a model: TBT weighted by steps, hit rate over all steps."""
    results = [simulate_one(s, policy, ratio, None, config.max_decode, **{**TUNED, **kw})[0] for s in setups]
    steps = sum(r.decode_steps for r in results)
    tbt = sum(r.tbt_seconds * r.decode_steps for r in results) / steps
    bound = sum(r.bound_tbt_seconds * r.decode_steps for r in results) / steps
    hits = [r.decode_hit_rate for r in results for _ in range(r.decode_steps)]
    pf = sum(r.prefetch_copies for r in results)
    return {"tbt_seconds": tbt, "bound_tbt_seconds": bound, "decode_hit_rate": mean(hits), "decode_steps": steps, "prefetch_copies": pf,
            "prefetch_useful": sum(r.prefetch_useful for r in results), "predictor": results[0].predictor,
            "traces": [s.name for s in setups]}


def main_block(config: BenchConfig, model: str, setups: list[Setup], progress: "_Progress | None" = None
               ) -> list[dict]:
    """The main block's rows of one model: per cache ratio and policy, one prefill row per prompt
    length and one decode row, each with its own lower bound; after each cache ratio's rows, the
    `bound` rows (the bound of the `hybrimoe` rows) when hybrimoe is among the policies."""
    rows: list[dict] = []
    first = setups[0]
    for ratio in config.ratios:
        here: list[dict] = []
        for policy in config.policies:
            for n in config.prompts:
                r, _ = simulate_one(first, policy, ratio, n, 0, **TUNED)
                here.append({"block": "main", "phase": "prefill", "model": model, "policy": policy,
                             "cache_ratio": ratio, "prompt_tokens": n, "trace": first.name,
                             "ttft_seconds": r.ttft_seconds, "bound_ttft_seconds": r.bound_ttft_seconds,
                             "hit_rate": r.hit_rate, "prompt_wrapped": bool(
                                 [x for x in r.notes if "cycles" in x]), "predictor": r.predictor})
                if progress:
                    progress.tick(f"{model} prefill {n} {policy} cache {ratio}")
            here.append({"block": "main", "phase": "decode", "model": model, "policy": policy,
                         "cache_ratio": ratio, **_decode(setups, policy, ratio, config)})
            if progress:
                progress.tick(f"{model} decode {policy} cache {ratio}")
        rows += here + bound_rows(here)
    return rows


def bound_rows(rows: list[dict]) -> list[dict]:
    """A `bound` row for every main-block row of `hybrimoe`: its time is that row's bound."""
    out = []
    for r in rows:
        if r["block"] == "main" and r["policy"] == BOUND_OF:
            key = "ttft_seconds" if r["phase"] == "prefill" else "tbt_seconds"
            out.append({**r, "policy": BOUND, key: r["bound_" + key], "note": BOUND_NOTE})
    return out


def run_bench(config: BenchConfig, out: Path, only_batch: bool = False) -> dict:
    """Run every block (`only_batch`: the batched-decode block alone), write bench.json and the PNGs
    (not for `only_batch`) into `out`, return the JSON document."""
    from hybrimoe.sim.batch_bench import batch_block, summarise_batch

    out.mkdir(parents=True, exist_ok=True)
    models = _setups(config)
    n_models = len(models)
    n_batch = len(config.ratios) * len(config.batches) * len(config.policies)
    total = n_models * (len(config.ratios) * len(config.policies) * (len(config.prompts) + 1) + 2 * len(ABLATION)
                        + 2 * len(config.ratios) + len(config.accuracies) + 2 + n_batch)
    progress = _Progress(n_models * n_batch if only_batch else total)
    rows: list[dict] = []
    if only_batch:
        for model, setups in models.items():
            rows += batch_block(config, model, setups, progress)
        doc = {"profile": config.profile, "cpu_rate_scale": config.cpu_rate_scale, "simulated": True,
               "config": dataclasses.asdict(config), "tuned": TUNED, "rows": rows,
               "batch_summary": summarise_batch(rows)}
        (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return doc
    for model, setups in models.items():
        first = setups[0]
        rows += main_block(config, model, setups, progress)
        ratio = min(config.ratios)
        for policy in ABLATION:
            r, _ = simulate_one(first, policy, ratio, config.ablation_prompt, 0, **TUNED)
            rows.append({"block": "ablation", "phase": "prefill", "model": model, "policy": policy,
                         "cache_ratio": ratio, "prompt_tokens": config.ablation_prompt, "ttft_seconds": r.ttft_seconds})
            progress.tick(f"{model} ablation prefill {policy}")
            rows.append({"block": "ablation", "phase": "decode", "model": model, "policy": policy,
                         "cache_ratio": ratio, **_decode(setups, policy, ratio, config)})
            progress.tick(f"{model} ablation decode {policy}")
        for ratio in config.ratios:
            for cache in ("mrs", "lru"):
                preset = dataclasses.replace(get_preset("hybrimoe-cache-only"), cache=cache,
                                             name=f"cache-only-{cache}")
                rows.append({"block": "cache", "phase": "decode", "model": model, "policy": preset.name,
                             "cache": cache, "cache_ratio": ratio, **_decode(setups, preset, ratio, config)})
                progress.tick(f"{model} caching {cache} cache {ratio}")
        ratio = min(config.ratios)
        variants: list[tuple[str, dict, object]] = [(f"accuracy {a:g}", {"predictor_accuracy": a}, "hybrimoe")
                                                    for a in config.accuracies]
        dev = first.warmup
        if dev:
            variants.append(("cross-layer stats (dev)", {"predictor": CrossLayerStats(first.shape.top_k).fit(dev)},
                             "hybrimoe"))
        else:
            progress.tick(f"{model} prefetch: no dev trace for a learned predictor")
        variants.append(("no prefetch", {}, dataclasses.replace(get_preset("hybrimoe"), prefetch="none",
                                                                name="hybrimoe-no-prefetch")))
        for label, kw, policy in variants:
            rows.append({"block": "prefetch", "phase": "decode", "model": model, "variant": label,
                         "cache_ratio": ratio, **_decode(setups, policy, ratio, config, **kw)})
            progress.tick(f"{model} prefetch {label}")
        rows += batch_block(config, model, setups, progress)
    doc = {"profile": config.profile, "cpu_rate_scale": config.cpu_rate_scale, "simulated": True, "config": dataclasses.asdict(config), "tuned": TUNED,
           "rows": rows,
           "summary": summarise(rows), "batch_summary": summarise_batch(rows)}
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    _plots(config, models, rows, out)
    return doc


def _speedup(rows: list[dict], policy: str, phase: str, key: str) -> list[tuple[dict, float]]:
    """(row, baseline time / policy time) for every main-block row of `policy`."""
    base = {(r["model"], r["cache_ratio"], r.get("prompt_tokens")): r[key] for r in rows
            if r["block"] == "main" and r["phase"] == phase and r["policy"] == BASELINE}
    return [(r, base[(r["model"], r["cache_ratio"], r.get("prompt_tokens"))] / r[key]) for r in rows
            if r["block"] == "main" and r["phase"] == phase and r["policy"] == policy]


def bound_share(row: dict, key: str) -> float:
    """The fraction of its bound's speedup over kTransformers that a row reaches: (kT / time) /
    (kT / own bound) = own bound / time, in (0, 1] (the bound is for the row's own cache content)."""
    return row["bound_" + key] / row[key]


def summarise(rows: list[dict]) -> dict:
    """Mean (arithmetic, like the paper) speedup over kTransformers per policy and phase, and the mean
    fraction of the bound's speedup reached (`bound_share`)."""
    out: dict = {}
    for policy in sorted({r["policy"] for r in rows if r["block"] == "main"}):
        out[policy] = {
            "prefill_speedup": mean(s for _, s in _speedup(rows, policy, "prefill", "ttft_seconds")),
            "decode_speedup": mean(s for _, s in _speedup(rows, policy, "decode", "tbt_seconds")),
            "prefill_bound_share": mean(bound_share(r, "ttft_seconds")
                                        for r, _ in _speedup(rows, policy, "prefill", "ttft_seconds")),
            "decode_bound_share": mean(bound_share(r, "tbt_seconds")
                                       for r, _ in _speedup(rows, policy, "decode", "tbt_seconds"))}
    return out


def _plots(config: BenchConfig, models: dict[str, list[Setup]], rows: list[dict], out: Path) -> None:
    from hybrimoe.sim.plot import plot_bars, plot_timeline

    groups = [(m, ratio) for m in models for ratio in config.ratios]
    labels = [f"{m.split('-')[0]} {ratio:g}" for m, ratio in groups]
    for phase, key in (("prefill", "ttft_seconds"), ("decode", "tbt_seconds")):
        series = {}
        shown = list(config.policies) + ([BOUND] if BOUND_OF in config.policies else [])
        for policy in shown:
            if policy == BASELINE:
                continue
            sp = _speedup(rows, policy, phase, key)
            series[policy] = [mean(s for r, s in sp if (r["model"], r["cache_ratio"]) == g) for g in groups]
        plot_bars(labels, series, out / f"speedup_{phase}.png", f"{phase} speedup over kTransformers",
                  f"{phase}: {'TTFT, mean over prompt lengths' if phase == 'prefill' else 'TBT'} "
                  f"(simulated, {config.profile})", reference=1.0)
    hit = {c: [next(r["decode_hit_rate"] for r in rows if r["block"] == "cache" and r["cache"] == c
                    and (r["model"], r["cache_ratio"]) == g) for g in groups] for c in ("mrs", "lru")}
    plot_bars(labels, {k.upper(): v for k, v in hit.items()}, out / "hit_rates.png", "decode hit rate",
              "expert-cache hit rate, MRS vs LRU (eval traces)")
    model, setups = next(iter(models.items()))
    prompt = config.ablation_prompt
    for policy in ("hybrimoe", BASELINE):
        _, sim = simulate_one(setups[0], policy, min(config.ratios), prompt, 0, timeline_step=0, **TUNED)
        plot_timeline(sim.spans, out / f"timeline_{policy}.png",
                      f"{model} ({setups[0].name}) {policy}, prefill of {prompt} tokens, cache "
                      f"{min(config.ratios):g}, simulated with {config.profile}")
