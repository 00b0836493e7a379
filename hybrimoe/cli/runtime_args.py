"""Hybrid-runtime flags shared by `generate`, `chat`, `serve` and `bench`.

    add_runtime_arguments(parser)        adds --policy, --expert-cache, --cache-ratio, --gpu-memory, ...
    runtime_options_from_args(args)      -> RuntimeOptions (validated), or None when no runtime flag was
                                         given (the engine then runs the plain reference executor)
    runtime_kwargs_from_args(args)       -> the same as keyword options for Engine.from_pretrained(**kw),
                                         plus the weight formats (--expert-dtype, --int4-group,
                                         --dense-dtype, --lm-head-dtype) and --cpu-kernel, which
                                         applies with or without the runtime
    expert_format_kwargs(args)           -> {expert_dtype, int4_group, dense_dtype, lm_head_dtype} for the loaders
Any runtime flag without --policy selects the `hybrimoe` preset. The device comes from the command's
own --device (the engine's), not from a flag here.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from hybrimoe.models.quant_linear import DENSE_DTYPES
from hybrimoe.moe.ort_kernels import CPU_KERNELS
from hybrimoe.moe.quant import DEFAULT_INT4_GROUP, FORMAT_NAMES, INT4_GROUPS
from hybrimoe.runtime_options import RuntimeOptions, parse_bytes

DEFAULT_POLICY = "hybrimoe"
DEFAULT_PREFETCH_DEPTH = 3


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    fmt = parser.add_argument_group("weight formats (with or without the hybrid runtime)")
    fmt.add_argument("--expert-dtype", choices=FORMAT_NAMES, default=None,
                     help="routed experts in host memory, GPU cache and copies: bf16, int8 or int4 (quantised at "
                          "load; fp32/fp16 too); q4_0 = int4 by llama.cpp's symmetric Q4_0 rule (what "
                          "--cpu-kernel ggml computes fastest); default: the model's --dtype")
    fmt.add_argument("--int4-group", type=int, default=None, metavar="N",
                     help=f"int4: inputs per scale/zero group, one of {', '.join(map(str, INT4_GROUPS))} "
                          f"(default {DEFAULT_INT4_GROUP}); experts and dense linears alike")
    fmt.add_argument("--dense-dtype", choices=DENSE_DTYPES, default=None,
                     help="the decoder layers' linears (attention projections, dense MLPs, shared experts): "
                          "int8 or int4 (q4_0: int4 by Q4_0's symmetric rule, which --cpu-kernel ggml decodes "
                          "with), quantised at load and computed with the experts' kernels; default: the model's --dtype")
    fmt.add_argument("--lm-head-dtype", choices=DENSE_DTYPES, default=None,
                     help="the output projection: int8, int4 or q4_0 (default: the model's --dtype)")
    fmt.add_argument("--cpu-kernel", choices=CPU_KERNELS, default=None,
                     help="CPU int4 matmuls (experts and dense linears): torch's int4 kernel (default), "
                          "onnxruntime's MatMulNBits (int8 activations; faster, and its packed copy of the int4 "
                          "weights takes ~1.5x their bytes of host memory (a CPU-only run then frees the store's own "
                          "copy); pip install onnxruntime onnx), or ggml: llama.cpp's own kernels for q4_0 weights "
                          "(--expert-dtype q4_0, and --dense-dtype/--lm-head-dtype q4_0 for the dense linears: a "
                          "CPU-only GQA model then decodes each layer as one ggml graph; its copy takes 0.9x the "
                          "int4 bytes; other int4 linears on onnxruntime when installed; pip install llama-cpp-python)")
    group = parser.add_argument_group("hybrid runtime (expert placement; off unless one of these is given)")
    group.add_argument("--policy", default=None,
                       help="placement preset: resident, ktransformers, llamacpp, gpu-lru, fiddler, hybrimoe, ... "
                            f"(default {DEFAULT_POLICY} when any runtime flag is given)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--expert-cache", metavar="BYTES",
                      help="device memory for cached routed experts, e.g. 12GB, 8GiB (default: the preset's ratio)")
    size.add_argument("--cache-ratio", type=float, metavar="FRACTION",
                      help="cache this fraction of all routed experts (0..1; default 0.25)")
    group.add_argument("--gpu-memory", metavar="BYTES",
                       help="total device budget (dense part + expert cache); checked before loading weights")
    group.add_argument("--per-layer-cache", action="store_true",
                       help="split the cache evenly per MoE layer instead of one pool shared by all layers")
    group.add_argument("--cpu-threads", type=int, metavar="N",
                       help="torch threads of the CPU expert worker (default: cores - 1)")
    group.add_argument("--no-pin-memory", action="store_true",
                       help="keep the expert store in pageable host memory (default: pinned when on CUDA)")
    group.add_argument("--dummy-weights", metavar="CONFIG_JSON",
                       help="benchmark mode: random weights for this Hugging Face config.json (or a shape name "
                            "such as deepseek-v2-lite), no checkpoint")
    group.add_argument("--replay-trace", metavar="TRACE",
                       help="routers follow this recorded routing trace (cycling) instead of their gates")
    group.add_argument("--cost-profile", metavar="NAME_OR_PATH",
                       help="cost-model profile the scheduler plans with (default: a calibration at start)")
    group.add_argument("--prefetch-depth", type=int, default=None, metavar="N",
                       help=f"MoE layers ahead that prefetching presets predict (default {DEFAULT_PREFETCH_DEPTH})")
    group.add_argument("--staging-slots", type=int, default=None, metavar="N",
                       help="device buffers (experts) for prefetched experts the cache does not keep, counted in "
                            "--gpu-memory; prefetching presets only (default 4)")
    group.add_argument("--dummy-seed", type=int, default=None, help="seed of --dummy-weights (default 0)")


def _requested(args: argparse.Namespace) -> bool:
    flags = ("policy", "expert_cache", "cache_ratio", "gpu_memory", "cpu_threads", "dummy_weights",
             "replay_trace", "cost_profile", "prefetch_depth", "staging_slots", "dummy_seed")
    return any(getattr(args, f, None) is not None for f in flags) or bool(args.per_layer_cache or args.no_pin_memory)


def runtime_options_from_args(args: argparse.Namespace) -> RuntimeOptions | None:
    """Validated RuntimeOptions from parsed flags (None if no runtime flag); bad values -> ConfigError."""
    if not _requested(args):
        return None
    return RuntimeOptions(
        policy=args.policy or DEFAULT_POLICY,
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
        seed=0 if args.dummy_seed is None else args.dummy_seed,
        prefetch_depth=DEFAULT_PREFETCH_DEPTH if args.prefetch_depth is None else args.prefetch_depth,
        **({} if args.staging_slots is None else {"staging_slots": args.staging_slots}),
    ).validated()


def expert_format_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """{expert_dtype, int4_group, dense_dtype, lm_head_dtype} from their flags (only those given)."""
    out = {name: getattr(args, name, None) for name in ("expert_dtype", "int4_group", "dense_dtype", "lm_head_dtype")}
    return {k: v for k, v in out.items() if v is not None}


def runtime_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword options for `Engine.from_pretrained(model_dir, dtype, **kwargs)`: the expert format, the CPU
    kernel, and every RuntimeOptions field except `device` (the engine passes its own) when the runtime was
    requested."""
    options = runtime_options_from_args(args)
    kernel = {} if getattr(args, "cpu_kernel", None) is None else {"cpu_kernel": args.cpu_kernel}
    if options is None:
        return {**expert_format_kwargs(args), **kernel}
    return {**expert_format_kwargs(args), **kernel,
            **{f.name: getattr(options, f.name) for f in fields(options) if f.name != "device"}}
