"""Glue shared by `hybrimoe simulate` and `hybrimoe bench`: load a trace's model shape, profile and
warm-up traces, and run a grid of (policy, cache ratio) simulations. Every result carries the
lower bound (hybrimoe.sim.bound) for the cache content its own run held; the pseudo-policy `bound`
is the `hybrimoe` run's bound, reported as a row of its own."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from hybrimoe.errors import TraceError
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.presets import Preset, get_preset
from hybrimoe.policy.shape import ModelShape
from hybrimoe.sim.bound import phase_bounds
from hybrimoe.sim.costs import ProfileCosts
from hybrimoe.sim.metrics import SimResult
from hybrimoe.sim.prompt import build_workload
from hybrimoe.sim.simulator import SimConfig, Simulator
from hybrimoe.trace.format import RoutingTrace

log = logging.getLogger(__name__)
BOUND = "bound"  # pseudo-policy: the lower bound for the cache content `hybrimoe` held
BOUND_OF = "hybrimoe"
BOUND_NOTE = f"lower bound for the cache content {BOUND_OF} held (hybrimoe.sim.bound), not a policy"


@dataclass
class Setup:
    """A trace with what it is simulated against."""

    trace: RoutingTrace
    name: str  # file name, for tables
    shape: ModelShape
    costs: ProfileCosts
    profile: str
    warmup: list[RoutingTrace] = field(default_factory=list)  # dev traces of the model (hot set)
    warmup_note: str = ""


def _stem(path: Path) -> str:
    return Path(path).name.split(".")[0]  # cooking_1.json and its packaged copy cooking_1.jsonl.gz alike


def dev_traces(model: str, exclude: Path | None = None) -> list[RoutingTrace]:
    """The packaged dev traces of `model` (never eval ones), minus `exclude` (the simulated trace:
    its packaged copy, or the original file it was converted from); [] when none."""
    from hybrimoe.data import packaged_traces

    try:
        found = packaged_traces(model, "dev")
    except TraceError:
        return []
    return [RoutingTrace.load(t.path) for t in found
            if exclude is None or (t.path.resolve() != Path(exclude).resolve() and _stem(t.path) != _stem(exclude))]


def make_setup(trace: RoutingTrace, name: str, shape_name: str | None, profile: str,
               trace_path: Path | None = None, cpu_rate_scale: float = 1.0) -> Setup:
    """`cpu_rate_scale`: the profile's CPU made that many times slower (`CostModel.with_cpu_rate_scale`)."""
    shape = ModelShape.named(shape_name or trace.header.model)
    cost_model = CostModel.load(profile).with_cpu_rate_scale(cpu_rate_scale)
    warmup = dev_traces(shape.name, trace_path)
    note = (f"hot set from {len(warmup)} dev trace(s) of {shape.name}" if warmup
            else "no dev trace of this model: hot set from the simulated trace itself")
    return Setup(trace, name, shape, ProfileCosts(cost_model, shape), cost_model.name, warmup, note)


def simulate_one(setup: Setup, policy: str | Preset, cache_ratio: float, prompt_tokens: int | None = None,
                 max_decode: int | None = None, predictor_accuracy: float = 0.8, timeline_step: int | None = None,
                 horizon: int = 3, mrs_alpha: float = 0.5, predictor=None,
                 per_layer_cache: bool = False, batch: int = 1) -> tuple[SimResult, Simulator]:
    """Simulate `policy` (a preset name, a Preset, or `bound`) on `setup`'s trace; the result carries
    `bound_ttft_seconds` / `bound_tbt_seconds` of its own run. For `bound` the row is the `hybrimoe`
    run with TTFT and TBT replaced by that run's bounds (its other fields are the hybrimoe run's).
    `batch`: sequences decoded together (hybrimoe.sim.prompt); TBT is then the mean step."""
    if policy == BOUND:
        result, sim = simulate_one(setup, BOUND_OF, cache_ratio, prompt_tokens, max_decode, predictor_accuracy,
                                   timeline_step, horizon, mrs_alpha, predictor, per_layer_cache, batch)
        return as_bound_row(result), sim
    workload = build_workload(setup.trace, prompt_tokens, max_decode, batch)
    preset = get_preset(policy) if isinstance(policy, str) else policy
    config = SimConfig(preset, cache_ratio, predictor_accuracy=predictor_accuracy, predictor=predictor,
                       horizon=horizon, mrs_alpha=mrs_alpha, timeline_step=timeline_step,
                       per_layer_cache=per_layer_cache)
    sim = Simulator(setup.shape, setup.costs, config, setup.warmup)
    result = sim.run(setup.trace, workload)
    result.trace, result.profile = setup.name, setup.profile
    result.notes.append(setup.warmup_note)
    # each phase's bound with the costs that phase ran with (kTransformers' decode: CUDA-graph launches)
    result.bound_ttft_seconds = phase_bounds([f for f in sim.forwards if f.phase == "prefill"],
                                             sim.phase_costs("prefill"))[0]
    result.bound_tbt_seconds = phase_bounds([f for f in sim.forwards if f.phase == "decode"],
                                            sim.phase_costs("decode"))[1]
    return result, sim


def as_bound_row(result: SimResult) -> SimResult:
    """The `bound` row made from the `hybrimoe` run's result: TTFT / TBT are its bounds."""
    tps = None if not result.bound_tbt_seconds else result.batch / result.bound_tbt_seconds
    return replace(result, policy=BOUND, ttft_seconds=result.bound_ttft_seconds,
                   tbt_seconds=result.bound_tbt_seconds, decode_tokens_per_second=tps,
                   notes=[BOUND_NOTE + f"; TTFT {_ms(result.ttft_seconds)} ms and TBT {_ms(result.tbt_seconds)} ms "
                          f"under {result.policy}; the other fields are that run's"] + list(result.notes))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"
