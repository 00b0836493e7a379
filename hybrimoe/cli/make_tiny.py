"""`hybrimoe make-tiny`: write a tiny random checkpoint (+ tokenizer) of one MoE family for tests and demos."""

from __future__ import annotations

import argparse

from hybrimoe.cli.paths import check_output_dir
from hybrimoe.tiny import FAMILIES, LAYOUTS, make_tiny


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-tiny", help="write a tiny random checkpoint of an MoE family",
                              description=__doc__)
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64, help="hidden size (multiple of 16)")
    p.add_argument("--layout", choices=LAYOUTS, default="per-expert",
                   help="on-disk expert layout: one tensor per expert matrix, or fused 3-D tensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")  # an existing file, or a place that cannot be written: refused
    out = make_tiny(args.family, args.out, layers=args.layers, experts=args.experts, top_k=args.top_k,
                    hidden=args.hidden, layout=args.layout, seed=args.seed)
    print(out)
    return 0
