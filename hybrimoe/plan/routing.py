"""Which routing a plan simulates: a recorded trace (--trace), the packaged EVAL trace of the same
model, or synthetic routing fitted to the packaged dev traces (hybrimoe.plan.synthetic), in that order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hybrimoe.errors import TraceError
from hybrimoe.plan.synthetic import synthetic_trace
from hybrimoe.policy.shape import ModelShape
from hybrimoe.trace.format import RoutingTrace

log = logging.getLogger(__name__)


@dataclass
class Routing:
    trace: RoutingTrace
    label: str  # says where the routing comes from (printed with every figure)
    synthetic: bool
    warmup: list[RoutingTrace] = field(default_factory=list)  # picks the initial hot set (never the run's own)
    warmup_note: str = ""


def _fits(shape: ModelShape, trace: RoutingTrace) -> bool:
    h = trace.header
    return (h.num_experts == shape.num_experts and h.top_k == shape.top_k
            and sorted(h.moe_layers) == sorted(shape.moe_layers))


def packaged_model_for(shape: ModelShape) -> str | None:
    """The packaged trace model of the same name, else the only one of the same structure (layers,
    experts, top-k); None when there is none."""
    from hybrimoe.data import packaged_traces

    traces = packaged_traces()
    names = {t.model for t in traces}
    if shape.name in names:
        return shape.name
    for name in sorted(names):
        trace = next(t for t in traces if t.model == name)
        header = RoutingTrace.load(trace.path).header
        if (header.num_layers, header.num_experts, header.top_k, sorted(header.moe_layers)) == \
                (shape.num_layers, shape.num_experts, shape.top_k, sorted(shape.moe_layers)):
            return name
    return None


def choose_routing(shape: ModelShape, trace_file: str | None, prompt_tokens: int, decode_tokens: int,
                   seed: int = 0) -> Routing:
    from hybrimoe.data import packaged_traces
    from hybrimoe.sim.runner import dev_traces
    from hybrimoe.trace.importers import load_any_trace

    if trace_file is not None:
        trace = load_any_trace(trace_file)
        if not trace.tokens:
            raise TraceError(f"--trace {trace_file}: the trace has no routed tokens")
        if not _fits(shape, trace):
            h = trace.header
            raise TraceError(f"--trace {trace_file} was recorded from {h.model} ({h.num_experts} experts, top-{h.top_k}, "
                             f"{len(h.moe_layers)} MoE layers), not {shape.name} ({shape.num_experts} experts, "
                             f"top-{shape.top_k}, {len(shape.moe_layers)} MoE layers)")
        return Routing(trace, f"recorded trace {Path(trace_file).name}", False, [],
                       "hot set from the recorded trace itself")
    model = packaged_model_for(shape)
    if model is not None:
        evals = packaged_traces(model, "eval")
        chosen = max(evals, key=lambda t: t.path.stat().st_size)  # the longest eval trace
        trace = RoutingTrace.load(chosen.path)
        warmup = dev_traces(model, chosen.path)
        return Routing(trace, f"real routing of {model} (packaged eval trace {chosen.path.name})", False, warmup,
                       f"hot set from {len(warmup)} dev trace(s) of {model}")
    trace = synthetic_trace(shape, prompt_tokens, decode_tokens, seed)
    warm = synthetic_trace(shape, prompt_tokens, decode_tokens, seed, sequence_seed=seed + 1)
    log.info("no routing trace of %s: synthetic routing (per-layer skew and reuse fitted to the packaged "
             "dev traces of real models)", shape.name)
    return Routing(trace, "SYNTHETIC routing (per-layer skew and reuse fitted to packaged real traces)", True,
                   [warm], "hot set from a second synthetic sequence")
