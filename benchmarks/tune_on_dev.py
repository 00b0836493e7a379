"""Tune the simulator-facing HybriMoE parameters on DEV traces only (never on eval traces).

- MRS alpha: decode hit rate of MRS (kTransformers scheduling, misses filled in link idle time)
  at cache ratios 0.25 and 0.5, averaged over every dev trace of every model;
- prefetch look-ahead L (MoE layers): HybriMoE decode TBT at the bench's cache ratios 0.25, 0.5 and
  0.75, predictor accuracy 0.8, relative to the same run without prefetching, averaged over dev traces
  and ratios (so that no model's absolute step time dominates). (Until 2026-11-30 only ratio 0.25 and
  L <= 4 were tried; a copy of a Mixtral expert spans 2-4 of its layers, so larger caches, with
  fewer misses per layer, profit from looking further.) Both runs use the paper's MRS alpha 0.5, not the alpha chosen above
  (tuned independently).
The hot set of each dev trace comes from the model's other dev traces (the trace itself excluded).
Writes one JSON document to stdout (and --out), which docs/BENCH.md records.

    .venv/bin/python benchmarks/tune_on_dev.py --out benchmarks/tune_on_dev.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from statistics import mean

from hybrimoe.data import packaged_traces
from hybrimoe.policy.presets import get_preset
from hybrimoe.sim.runner import make_setup, simulate_one
from hybrimoe.trace.format import RoutingTrace
from machine import print_and_write  # benchmarks/machine.py

ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
HORIZONS = (1, 2, 3, 4, 6, 8)
RATIOS = (0.25, 0.5, 0.75)
MAX_DECODE = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    setups = [make_setup(RoutingTrace.load(t.path), t.path.name.split(".")[0], t.model, "paper-a6000", t.path)
              for t in packaged_traces(role="dev")]
    mrs = dataclasses.replace(get_preset("hybrimoe-cache-only"), name="cache-only-mrs")
    alpha_scores = {}
    for alpha in ALPHAS:
        hits = [simulate_one(s, mrs, ratio, None, MAX_DECODE, mrs_alpha=alpha)[0].decode_hit_rate
                for s in setups for ratio in (0.25, 0.5)]
        alpha_scores[alpha] = mean(hits)
        logging.info("alpha %.1f: mean dev decode hit rate %.4f  [%.0fs]", alpha, alpha_scores[alpha],
                     time.perf_counter() - start)
    no_prefetch = dataclasses.replace(get_preset("hybrimoe"), prefetch="none", name="hybrimoe-no-prefetch")
    base = [simulate_one(s, no_prefetch, ratio, None, MAX_DECODE)[0].tbt_seconds for s in setups for ratio in RATIOS]
    horizon_scores = {}
    for horizon in HORIZONS:
        tbt = [simulate_one(s, "hybrimoe", ratio, None, MAX_DECODE, horizon=horizon)[0].tbt_seconds
               for s in setups for ratio in RATIOS]
        horizon_scores[horizon] = mean(t / b for t, b in zip(tbt, base))
        logging.info("L %d: mean dev TBT / TBT without prefetch %.4f  [%.0fs]", horizon, horizon_scores[horizon],
                     time.perf_counter() - start)
    doc = {"dev_traces": [s.name for s in setups], "profile": "paper-a6000", "max_decode": MAX_DECODE,
           "horizon_cache_ratios": list(RATIOS),
           "mrs_alpha": {"scores": alpha_scores, "best": max(alpha_scores, key=alpha_scores.get)},
           "horizon": {"scores_relative_tbt": horizon_scores, "best": min(horizon_scores, key=horizon_scores.get)}}
    text = json.dumps(doc, indent=1)
    print_and_write(text, args.out)


if __name__ == "__main__":
    main()
