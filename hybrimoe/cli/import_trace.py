"""`hybrimoe import-trace IN... --out FILE`: convert original routing traces to the project format."""

from __future__ import annotations

import argparse
import logging

from hybrimoe.cli.paths import check_output_file
from hybrimoe.errors import TraceError
from hybrimoe.trace.format import RoutingTrace, TokenRouting
from hybrimoe.trace.importers import load_any_trace

log = logging.getLogger(__name__)


def merge_traces(traces: list[RoutingTrace], names: list[str]) -> RoutingTrace:
    """One trace holding every sequence of `traces`, renumbered 0, 1, ... in input order."""
    first = traces[0].header
    for trace, name in zip(traces[1:], names[1:]):
        h = trace.header
        if (h.model, h.num_layers, h.num_experts, h.top_k) != (first.model, first.num_layers, first.num_experts, first.top_k):
            raise TraceError(f"{name}: model {h.model} ({h.num_layers} layers x {h.num_experts} experts, "
                             f"top-{h.top_k}) differs from {names[0]}: {first.model} ({first.num_layers} x "
                             f"{first.num_experts}, top-{first.top_k}); import them into separate files")
    moe_layers = sorted({layer for t in traces for layer in t.header.moe_layers})
    header = type(first)(model=first.model, num_layers=first.num_layers, num_experts=first.num_experts,
                         top_k=first.top_k, moe_layers=moe_layers,
                         source="; ".join(t.header.source for t in traces))
    merged = RoutingTrace(header)
    next_seq = 0
    for trace in traces:
        for _, tokens in sorted(trace.sequences().items()):
            merged.tokens.extend(TokenRouting(seq=next_seq, pos=t.pos, phase=t.phase, layers=t.layers,
                                              token_id=t.token_id) for t in tokens)
            next_seq += 1
    return merged


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out")
    traces = [load_any_trace(path) for path in args.inputs]
    trace = merge_traces(traces, list(args.inputs))
    if args.model:
        trace.header.model = args.model
    trace.save(args.out)
    phases = {p: sum(t.phase == p for t in trace.tokens) for p in ("prefill", "decode")}
    log.info("wrote %s: %s, %d sequences, %d tokens (%d prefill, %d decode)", args.out, trace.header.model,
             len(trace.sequences()), len(trace.tokens), phases["prefill"], phases["decode"])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import-trace", help="convert Mixtral/Qwen routing traces to the project format",
                              description=__doc__)
    p.add_argument("inputs", nargs="+", metavar="IN", help="trace files (Mixtral .jsonl, Qwen .json, or project)")
    p.add_argument("--out", required=True, help="output file (.jsonl, or .jsonl.gz to compress)")
    p.add_argument("--model", help="model name for the header (default: from the input)")
    p.set_defaults(func=run)
