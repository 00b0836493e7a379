"""`hybrimoe` command line: each subcommand lives in its own module of this package.

A subcommand module exposes `register(subparsers) -> None`, which adds its parser and sets
`func=run` where `run(args) -> int` is the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from hybrimoe.errors import HybrimoeError

# OpenMP threads that wait for work by spinning (libgomp's default) are ruinous when the cores are shared:
# with other processes on the cores, or the hybrid runtime's CPU worker team next to the main thread's
# on the same cores, 2-thread CPU decode measured 1-2 tok/s spinning against 20-50 with PASSIVE on a
# busy 2-core VM (benchmarks/RESULTS_formats.md, "Threading"); on an idle machine PASSIVE was 35-40%
# slower (small model, many small ops). Stable beats fast-when-lucky: PASSIVE unless the user chose (the
# variable is read when torch loads OpenMP, so it is set here, before any subcommand imports torch).
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def _set_openmp_defaults() -> None:
    if "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    for key, value in OMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


# Subcommand modules, in the order `--help` lists them. A module that does not exist yet is skipped.
SUBCOMMAND_MODULES = [
    "generate", "chat", "serve", "simulate", "bench", "calibrate", "plan", "make_tiny", "import_trace",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrimoe",
        description="Run Mixture-of-Experts LLMs on one GPU plus host memory (HybriMoE).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"hybrimoe.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hybrimoe.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _set_openmp_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HybrimoeError as exc:
        print(f"hybrimoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as other filters do
        try:  # and keep the interpreter's flush at exit from raising it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        return 1
    except OSError as exc:  # a file that cannot be written or read (disk full, permissions): say so, no traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"hybrimoe {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
