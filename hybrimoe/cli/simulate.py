"""`hybrimoe simulate`: run policies over routing traces on a virtual clock (cost-model profile)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hybrimoe.cli.paths import check_output_file
from hybrimoe.errors import ConfigError, TraceError

log = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulate scheduling/caching policies on routing traces",
                              description=__doc__)
    p.add_argument("--trace", nargs="+", required=True, metavar="FILE",
                   help="routing traces (project format, or the original Mixtral JSONL / Qwen JSON)")
    p.add_argument("--model-shape", default=None, metavar="NAME",
                   help="named model shape or config.json path (default: the trace's model)")
    p.add_argument("--profile", default="paper-a6000", metavar="NAME", help="cost profile (default paper-a6000)")
    p.add_argument("--cpu-rate-scale", type=float, default=1.0, metavar="S",
                   help="make the profile's CPU S times slower (sensitivity; default 1)")
    p.add_argument("--policy", type=_names, default=["hybrimoe", "ktransformers"], metavar="NAME[,NAME...]",
                   help="presets: hybrimoe, ktransformers, llamacpp, gpu-lru, fiddler, resident, hybrimoe-oracle "
                        "(true future routing + optimal plans; a policy, not a limit), the hybrimoe-* ablations; "
                        "and bound: the computed lower bound for the cache content hybrimoe held")
    p.add_argument("--cache-ratio", type=_floats, default=[0.25], metavar="R[,R...]",
                   help="fraction of all routed experts the GPU cache holds (default 0.25)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help="prompt length (default: the trace's own prefill tokens)")
    p.add_argument("--max-decode", type=int, default=None, metavar="N", help="at most N decode steps")
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="decode B sequences together (continuous batching): each decode step carries one token of "
                        "each; the B lanes start at B evenly spaced offsets of the trace's decode tokens and wrap "
                        "(default 1). TBT is then the step, tok/s = B / TBT; the prompt is still one sequence's")
    p.add_argument("--predictor-accuracy", type=float, default=0.8, metavar="A",
                   help="accuracy of the prefetch predictor (true routing with noise; default 0.8)")
    p.add_argument("--predictor", choices=("noise", "cross-layer"), default="noise",
                   help="prefetch predictions: true routing with noise at --predictor-accuracy (default), or "
                        "co-activation statistics learned on the model's packaged dev traces")
    p.add_argument("--per-layer-cache", action="store_true",
                   help="give each MoE layer an equal share of the cache slots instead of one global budget")
    p.add_argument("--mrs-alpha", type=float, default=0.5, metavar="A", help="MRS decay (default 0.5, the paper's)")
    p.add_argument("--horizon", type=int, default=3, metavar="L", help="prefetch look-ahead in MoE layers (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per (trace, policy, cache ratio)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="Gantt timeline of the first run's forward --plot-step (0 = prefill)")
    p.add_argument("--plot-step", type=int, default=0, metavar="K")
    p.set_defaults(func=run)


def _fmt(seconds: float | None, scale: float = 1e3) -> str:
    return "-" if seconds is None else f"{seconds * scale:.2f}"


def _reach(bound: float | None, seconds: float | None) -> str:
    """The fraction of the bound's speedup a row reaches: bound / time."""
    return "-" if bound is None or not seconds else f"{bound / seconds:.0%}"


def run(args: argparse.Namespace) -> int:
    from hybrimoe.policy.predictor import CrossLayerStats
    from hybrimoe.policy.presets import get_preset
    from hybrimoe.sim.runner import BOUND, make_setup, simulate_one
    from hybrimoe.trace.importers import load_any_trace

    for name in args.policy:
        if name != BOUND:
            get_preset(name)  # fail early on a bad name
    if any(not 0.0 <= r <= 1.0 for r in args.cache_ratio):
        raise ConfigError(f"--cache-ratio values must be in [0, 1], got {args.cache_ratio}")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if not 0.0 <= args.predictor_accuracy <= 1.0:
        raise ConfigError(f"--predictor-accuracy must be in [0, 1], got {args.predictor_accuracy}")
    if args.plot is not None:
        check_output_file(args.plot, "--plot")
    traces = [(path, load_any_trace(path)) for path in args.trace]  # every file checked before any output
    for path, trace in traces:
        if not trace.tokens:
            raise TraceError(f"{path}: the trace has a header but no routed tokens; nothing to simulate")
    if not args.json:
        print("bound = lower bound for the cache content of the row's own run; reach = bound / time "
              "(the fraction of the bound's speedup the policy reaches). Simulated, not measured.")
        print(f"{'trace':22s} {'policy':24s} {'cache':>5s} {'prompt':>6s} {'TTFT ms':>9s} {'bound':>8s} "
              f"{'reach':>5s} {'TBT ms':>8s} {'bound':>7s} {'reach':>5s} {'hit':>6s} {'GB copied':>9s} "
              f"{'cpu/gpu/link busy':>18s} {'B':>3s} {'tok/s':>8s}")
    plotted = False
    for path, trace in traces:
        setup = make_setup(trace, Path(path).name, args.model_shape, args.profile, Path(path), args.cpu_rate_scale)
        predictor = None
        if args.predictor == "cross-layer":
            if not setup.warmup:
                raise ConfigError(f"--predictor cross-layer needs packaged dev traces of {setup.shape.name}; "
                                  "there are none")
            predictor = CrossLayerStats(setup.shape.top_k).fit(setup.warmup, args.horizon)
        for policy in args.policy:
            for ratio in args.cache_ratio:
                want_plot = args.plot is not None and not plotted
                result, sim = simulate_one(setup, policy, ratio, args.prompt_tokens, args.max_decode,
                                           args.predictor_accuracy, args.plot_step if want_plot else None,
                                           horizon=args.horizon, mrs_alpha=args.mrs_alpha, predictor=predictor,
                                           per_layer_cache=args.per_layer_cache, batch=args.batch)
                if want_plot:
                    from hybrimoe.sim.plot import plot_timeline

                    plot_timeline(sim.spans, args.plot, f"{setup.name} {policy} cache {ratio:g} forward "
                                  f"{args.plot_step} ({setup.profile}, simulated)")
                    plotted = True
                    log.info("timeline written to %s", args.plot)
                if args.json:
                    print(json.dumps(result.row()), flush=True)
                else:
                    busy = f"{result.cpu_busy:.2f}/{result.gpu_busy:.2f}/{result.link_busy:.2f}"
                    print(f"{setup.name[:22]:22s} {policy:24s} {ratio:5.2f} {result.prompt_tokens:6d} "
                          f"{_fmt(result.ttft_seconds):>9s} {_fmt(result.bound_ttft_seconds):>8s} "
                          f"{_reach(result.bound_ttft_seconds, result.ttft_seconds):>5s} "
                          f"{_fmt(result.tbt_seconds):>8s} {_fmt(result.bound_tbt_seconds):>7s} "
                          f"{_reach(result.bound_tbt_seconds, result.tbt_seconds):>5s} {result.hit_rate:6.3f} "
                          f"{result.bytes_copied / 1e9:9.2f} {busy:>18s} {result.batch:3d} "
                          f"{_fmt(result.decode_tokens_per_second, 1.0):>8s}", flush=True)
    return 0
