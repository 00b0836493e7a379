"""`hybrimoe calibrate`: measure this machine's expert, copy and dense costs; write a cost profile."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hybrimoe.errors import ConfigError
from hybrimoe.policy.cost import FORMAT_NAMES, CostModel
from hybrimoe.policy.shape import ModelShape

log = logging.getLogger(__name__)


def _token_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--tokens {text!r}: expected comma-separated integers such as 1,2,4,8") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"--tokens {text!r}: token counts must be >= 1")
    return counts


def run(args: argparse.Namespace) -> int:
    from hybrimoe.calibrate import CalibrationSettings, calibrate  # imports torch: only when run

    if args.hidden and args.intermediate:
        hidden, intermediate, label = args.hidden, args.intermediate, f"{args.hidden}x{args.intermediate}"
    elif args.model or args.model_shape:
        shape = ModelShape.from_file(args.model) if args.model else ModelShape.named(args.model_shape)
        hidden, intermediate, label = shape.hidden, shape.moe_intermediate, shape.name
    else:
        raise ConfigError("say which expert to measure: --model DIR, --model-shape NAME, or --hidden H --intermediate I")
    settings = CalibrationSettings(hidden=hidden, intermediate=intermediate, dtype=args.dtype,
                                   token_counts=_token_counts(args.tokens), layers=args.layers,
                                   experts_per_layer=args.experts_per_layer, device=args.device,
                                   threads=args.threads, expert_dtype=args.expert_dtype, int4_group=args.int4_group,
                                   cpu_kernel=args.cpu_kernel)
    profile: CostModel = calibrate(settings, name=args.name or Path(args.out).stem)
    profile.extra["expert_of"] = label
    profile.save(args.out)
    log.info("wrote %s (experts %s): cpu %.1f GB/s %.2f TFLOP/s (+%.1f us, first x%.2f), gpu %.1f GB/s, copy %.1f GB/s",
             args.out, profile.extra.get("expert_format"), profile.cpu_stream_bandwidth / 1e9, profile.cpu_flops / 1e12, profile.cpu_expert_overhead * 1e6,
             profile.cpu_first_expert_penalty, profile.gpu_hbm_bandwidth / 1e9, profile.pcie_bandwidth / 1e9)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="measure CPU/GPU/copy expert costs; write a cost profile",
                              description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help="model directory (its config.json gives the expert shape)")
    src.add_argument("--model-shape", metavar="NAME", help="named model shape, e.g. mixtral-8x7b")
    p.add_argument("--hidden", type=int, help="expert hidden size H (with --intermediate, instead of a model)")
    p.add_argument("--intermediate", type=int, help="expert intermediate size I")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="activation and dense-weight dtype (default bf16)")
    p.add_argument("--expert-dtype", default=None, choices=list(FORMAT_NAMES),
                   help="expert format to measure, as the engine stores and computes it (default: --dtype)")
    p.add_argument("--int4-group", type=int, default=None, metavar="N", help="int4 group size (default: the engine's)")
    p.add_argument("--cpu-kernel", default="torch", choices=["torch", "onnxruntime", "ggml"],
                   help="CPU int4 kernel to measure (as `generate --cpu-kernel`; onnxruntime and ggml need "
                        "--expert-dtype int4 or q4_0)")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128", help="token counts to measure (default 1,2,...,128)")
    p.add_argument("--layers", type=int, default=5, help="simulated layers per token count (default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--experts-per-layer", type=int, default=4, help="experts run per layer (default 4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="GPU side: cuda if present")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--out", required=True, metavar="PROFILE.json", help="where to write the profile")
    p.set_defaults(func=run)
