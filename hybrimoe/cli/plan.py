"""`hybrimoe plan`: will a model run on this machine, how fast, and with which `serve` command (before
downloading it). Memory from the runtime's own accounting; speed simulated (cost profile + routing)."""

from __future__ import annotations

import argparse
import json
import logging

from hybrimoe.cli.paths import check_output_file
from hybrimoe.errors import ConfigError

log = logging.getLogger(__name__)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers) -> None:
    from hybrimoe.moe.ort_kernels import CPU_KERNELS
    from hybrimoe.plan.build import DEFAULT_FORMATS, DEFAULT_POLICIES
    from hybrimoe.plan.memory import DEFAULT_GPU_RESERVE

    p = subparsers.add_parser("plan", help="will a model fit and how fast will it run here (before downloading it)",
                              description=__doc__)
    p.add_argument("--model", required=True, metavar="DIR|config.json|SHAPE",
                   help="a checkpoint directory, its config.json, or a shipped shape (mixtral-8x7b, ...)")
    p.add_argument("--gpu-memory", metavar="BYTES", help="GPU memory, e.g. 24GB (default: this machine's CUDA device)")
    p.add_argument("--host-memory", metavar="BYTES", help="host RAM hybrimoe may use, e.g. 64GB (default: MemAvailable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default=None, metavar="NAME|FILE",
                     help="cost profile: desktop-4090 (default), paper-a6000, or a file from `hybrimoe calibrate`")
    src.add_argument("--calibrate", action="store_true",
                     help="measure this machine first (as `hybrimoe calibrate`, on its GPU when it has one), per format")
    p.add_argument("--expert-dtype", type=_names, default=DEFAULT_FORMATS, metavar="F[,F...]",
                   help=f"expert formats to consider (default {','.join(DEFAULT_FORMATS)})")
    p.add_argument("--int4-group", type=int, default=None, metavar="N", help="int4 group size (default 32)")
    p.add_argument("--policy", type=_names, default=DEFAULT_POLICIES, metavar="P[,P...]",
                   help=f"policies to compare (default {','.join(DEFAULT_POLICIES)})")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prompt length simulated (default 512)")
    p.add_argument("--decode-tokens", type=int, default=16, metavar="N", help="decode steps simulated (default 16)")
    p.add_argument("--context", type=int, default=4096, metavar="N",
                   help="context length the KV cache holds (serve --max-context; default 4096)")
    p.add_argument("--staging-slots", type=int, default=4, metavar="N", help="prefetch staging buffers (default 4)")
    p.add_argument("--gpu-reserve", default=str(DEFAULT_GPU_RESERVE), metavar="BYTES",
                   help="GPU memory kept for the CUDA context and activations (default 1GB)")
    p.add_argument("--cpu-kernel", default="torch", choices=CPU_KERNELS,
                   help="the CPU side's int4 kernel of the serve command (its copy of the int4 experts counts as "
                        "host memory: onnxruntime 1.5x their bytes, ggml 1x; other formats are refused; speeds come "
                        "from the profile unless --calibrate measures this kernel)")
    p.add_argument("--device", default="cuda", help="device of the serve command (default cuda; cpu: CPU fallback)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="dense weights (default bf16)")
    p.add_argument("--trace", default=None, metavar="FILE", help="routing recorded from this model (hybrimoe "
                   "generate --record-trace); default: a packaged trace of the model, else synthetic routing")
    p.add_argument("--optimize", choices=("decode", "ttft"), default="decode",
                   help="recommend the fastest decode (default) or time to first token")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic routing (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--plot", default=None, metavar="PNG", help="decode tokens/s against GPU memory per policy")
    p.set_defaults(func=run)


def _machine(args: argparse.Namespace):
    from hybrimoe.moe.ort_kernels import check_cpu_kernel
    from hybrimoe.moe.store import host_available_bytes
    from hybrimoe.plan.memory import Machine
    from hybrimoe.runtime_options import parse_bytes

    if args.gpu_memory is not None:
        gpu = parse_bytes(args.gpu_memory, "--gpu-memory")
    else:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("no CUDA device here: say how much GPU memory to plan for, e.g. --gpu-memory 24GB")
        gpu = torch.cuda.get_device_properties(0).total_memory
    host = parse_bytes(args.host_memory, "--host-memory") if args.host_memory is not None else host_available_bytes()
    if host is None:
        raise ConfigError("cannot read this machine's free host memory: give --host-memory, e.g. 64GB")
    for flag, value, low in (("--prompt-tokens", args.prompt_tokens, 1), ("--decode-tokens", args.decode_tokens, 1),
                             ("--context", args.context, 2), ("--staging-slots", args.staging_slots, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.context <= args.prompt_tokens:
        raise ConfigError(f"--context {args.context} must exceed --prompt-tokens {args.prompt_tokens}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ConfigError(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    return Machine(gpu, host, args.context, parse_bytes(args.gpu_reserve, "--gpu-reserve"), args.device, args.dtype,
                   check_cpu_kernel(args.cpu_kernel))


def _costs(args: argparse.Namespace, target, machine, formats: tuple[str, ...]):
    """(costs_for(FormatMemory) -> CostModel, profile label)."""
    from hybrimoe.plan.predict import format_costs
    from hybrimoe.policy.cost import CostModel

    shape = target.shape
    if not args.calibrate:
        profile = CostModel.load(args.profile or "desktop-4090")
        return (lambda mem: format_costs(profile, shape, mem.expert_bytes, machine.dtype)), profile.name
    import torch

    from hybrimoe.calibrate import CalibrationSettings, calibrate

    if not torch.cuda.is_available():
        log.warning("--calibrate: no CUDA device here, so the GPU side is measured on the CPU (the runtime's CPU "
                    "fallback); the predictions describe that, not the GPU of --gpu-memory")
    measured = {}
    for name in formats:
        log.info("calibrating %s experts %dx%d on this machine", name, shape.hidden, shape.moe_intermediate)
        settings = CalibrationSettings(hidden=shape.hidden, intermediate=shape.moe_intermediate, dtype=machine.dtype,
                                       expert_dtype=name, int4_group=args.int4_group, layers=3,
                                       cpu_kernel=machine.cpu_kernel if name in ("int4", "q4_0") else "torch")
        # inference mode, as the engine runs its kernels: the per-thread dequantisation workspace
        # (hybrimoe.moe.kernels.workspace) made under inference mode cannot be written outside it
        with torch.inference_mode():
            measured[name] = calibrate(settings, name=f"measured-{name}", progress=log.info)
    first = next(iter(measured.values()))
    device = first.extra.get("samples", {}).get("gpu_device", "cpu")
    return ((lambda mem: format_costs(measured[mem.fmt.name], shape, mem.expert_bytes, machine.dtype,
                                      mem.fmt.name, mem.fmt.name)),
            f"measured here by --calibrate (GPU side: {device})")


def run(args: argparse.Namespace) -> int:
    from hybrimoe.moe.quant import FORMAT_NAMES
    from hybrimoe.plan.build import check_fits, make_plan
    from hybrimoe.plan.report import row_json, text_report
    from hybrimoe.plan.target import resolve_target

    bad = [f for f in args.expert_dtype if f not in FORMAT_NAMES]
    if bad or not args.expert_dtype:
        raise ConfigError(f"--expert-dtype {','.join(bad) or '(empty)'}: formats are {', '.join(FORMAT_NAMES)}")
    if args.plot is not None:
        check_output_file(args.plot, "--plot")
    if not args.verbose:  # one budget line per row is noise here; the table says it all
        logging.getLogger("hybrimoe.moe.budget").setLevel(logging.WARNING)
    machine = _machine(args)
    target = resolve_target(args.model)
    costs_for, profile = _costs(args, target, machine, args.expert_dtype)
    plan = make_plan(target, machine, costs_for, profile, args.expert_dtype, args.policy, args.prompt_tokens,
                     args.decode_tokens, args.trace, args.int4_group, args.staging_slots, args.optimize, args.seed)
    if args.json:
        for row in plan.rows:
            print(json.dumps(row_json(plan, row)), flush=True)
    else:
        print("\n".join(text_report(plan)), flush=True)
    if args.plot is not None and any(r.prediction for r in plan.rows):
        from hybrimoe.plan.plot import plot_plan

        plot_plan(plan, args.plot)
        log.info("plot written to %s", args.plot)
    check_fits(plan)
    return 0
