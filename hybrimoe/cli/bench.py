"""`hybrimoe bench`: the paper's comparison, simulated on the packaged eval traces."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hybrimoe.cli.paths import check_output_dir

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="simulated HybriMoE vs baselines on the packaged eval traces",
                              description=__doc__)
    p.add_argument("--out", default="bench-out", metavar="DIR", help="where bench.json, bench.md and PNGs go")
    p.add_argument("--quick", action="store_true", help="one model, one cache ratio, few steps (~10 s)")
    p.add_argument("--profile", default="paper-a6000", metavar="NAME", help="cost profile (default paper-a6000)")
    p.add_argument("--cpu-rate-scale", type=float, default=1.0, metavar="S",
                   help="make the profile's CPU S times slower (bandwidth and FLOP rate / S, per-expert overhead "
                        "x S); docs/BENCH.md's sensitivity table uses the rate fitted to the paper's measured "
                        "kTransformers (benchmarks/fit_cpu_rate.py)")
    p.add_argument("--batch-only", action="store_true",
                   help="only the batched-decode table (batch 1, 4, 16 for every policy; docs/BENCH.md "
                        "\"Batched decode\"); bench.json and bench.md hold just that block")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from hybrimoe.policy.cost import CostModel
    from hybrimoe.sim.batch_bench import batch_markdown
    from hybrimoe.sim.bench import BenchConfig, run_bench
    from hybrimoe.sim.report import markdown

    CostModel.load(args.profile).with_cpu_rate_scale(args.cpu_rate_scale)  # bad values fail before any work
    check_output_dir(args.out, "--out")  # and so does an output directory that cannot be written
    config = BenchConfig.quick() if args.quick else BenchConfig()
    config = dataclasses.replace(config, profile=args.profile, cpu_rate_scale=args.cpu_rate_scale)
    out = Path(args.out)
    doc = run_bench(config, out, only_batch=args.batch_only)
    text = batch_markdown(doc) if args.batch_only else markdown(doc)
    (out / "bench.md").write_text(text, encoding="utf-8")
    print(text)
    log.info("wrote %s (bench.json, bench.md%s)", out,
             "" if args.batch_only else ", speedup_*.png, hit_rates.png, timeline_*.png")
    return 0
