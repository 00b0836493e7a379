"""Hybrid-runtime flags shared by `generate`, `chat`, `serve` and `bench`.

    add_runtime_arguments(parser)            adds --policy, --expert-cache, --cache-ratio, ...
    runtime_options_from_args(args)          -> hybrimoe.runtime_options.RuntimeOptions (validated)
"""

from __future__ import annotations

import argparse

from hybrimoe.runtime_options import RuntimeOptions, parse_bytes

RUNTIME_DESTS = ("policy", "expert_cache", "cache_ratio", "gpu_memory", "per_layer_cache", "cpu_threads",
                 "no_pin_memory", "dummy_weights", "replay_trace", "cost_profile", "dummy_seed", "prefetch_depth")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hybrid runtime (expert placement)")
    group.add_argument("--policy", default="hybrimoe",
                       help="placement preset: resident, ktransformers, llamacpp, gpu-lru, fiddler, hybrimoe, ... "
                            "(default hybrimoe)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--expert-cache", metavar="BYTES",
                      help="device memory for cached routed experts, e.g. 12GB, 8GiB (default: the preset's ratio)")
    size.add_argument("--cache-ratio", type=float, metavar="FRACTION",
                      help="cache this fraction of all routed experts (0..1)")
    group.add_argument("--gpu-memory", metavar="BYTES",
                       help="total device budget (dense part + expert cache); checked before loading weights")
    group.add_argument("--per-layer-cache", action="store_true",
                       help="split the cache evenly per MoE layer instead of one pool shared by all layers")
    group.add_argument("--cpu-threads", type=int, metavar="N",
                       help="torch threads of the CPU expert worker (default: cores - 1)")
    group.add_argument("--no-pin-memory", action="store_true",
                       help="keep the expert store in pageable host memory (default: pinned when on CUDA)")
    group.add_argument("--dummy-weights", metavar="CONFIG_JSON",
                       help="benchmark mode: random weights for this Hugging Face config.json, no checkpoint")
    group.add_argument("--replay-trace", metavar="TRACE",
                       help="routers follow this recorded routing trace (cycling) instead of their gates")
    group.add_argument("--cost-profile", metavar="NAME_OR_PATH",
                       help="cost-model profile the scheduler plans with (default: the built-in one)")
    group.add_argument("--prefetch-depth", type=int, default=3, metavar="N",
                       help="MoE layers ahead that prefetching presets predict (default 3, as the paper)")
    group.add_argument("--dummy-seed", type=int, default=0, help="seed of --dummy-weights (default 0)")


def runtime_options_from_args(args: argparse.Namespace) -> RuntimeOptions:
    """Validated RuntimeOptions from parsed flags; bad values raise hybrimoe.errors.ConfigError."""
    return RuntimeOptions(
        policy=args.policy,
        expert_cache_bytes=None if args.expert_cache is None else parse_bytes(args.expert_cache, "--expert-cache"),
        cache_ratio=args.cache_ratio,
        gpu_memory_bytes=None if args.gpu_memory is None else parse_bytes(args.gpu_memory, "--gpu-memory"),
        per_layer_cache=bool(args.per_layer_cache),
        cpu_threads=args.cpu_threads,
        device=getattr(args, "device", None) or "auto",  # the engine's --device, when the command has one
        pin_memory=False if args.no_pin_memory else None,
        dummy_weights=args.dummy_weights,
        replay_trace=args.replay_trace,
        cost_profile=args.cost_profile,
        seed=args.dummy_seed,
        prefetch_depth=args.prefetch_depth,
    ).validated()
