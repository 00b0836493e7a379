"""Predicted time to first token and decode tokens/s of one (policy, expert format, cache) row: the
simulator (hybrimoe.sim) running the policy's preset on the chosen routing, priced by a cost profile.

Costs per format: the profile's rates at the format's stored bytes per expert, for the CPU, the copy and
the GPU alike (what the runtime does with --cost-profile: hybrimoe.moe.calibrate.profile_costs), and the
dense part at the plan's --dtype bits, as `serve` holds it (a shipped profile's own dense_bits describe
kTransformers' int4 dense layers). Presets run eager, as hybrimoe's runtime runs them: kTransformers'
preset is priced here WITHOUT the CUDA graphs the simulator gives the real kTransformers' decode.
Every figure is simulated, never measured.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from hybrimoe.plan.memory import DeviceBudget
from hybrimoe.plan.routing import Routing
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.presets import get_preset
from hybrimoe.policy.shape import ModelShape

log = logging.getLogger(__name__)
DTYPE_BITS = {"bf16": 16.0, "fp16": 16.0, "fp32": 32.0}


@dataclass
class Prediction:
    ttft_seconds: float | None
    tbt_seconds: float | None
    bound_ttft_seconds: float | None
    bound_tbt_seconds: float | None
    hit_rate: float
    prompt_tokens: int
    decode_steps: int
    notes: list[str]

    @property
    def decode_tokens_per_second(self) -> float | None:
        return 1.0 / self.tbt_seconds if self.tbt_seconds else None


def format_costs(profile: CostModel, shape: ModelShape, expert_bytes: int, dtype: str,
                 measured_format: str | None = None, fmt_name: str = "") -> CostModel:
    """The profile for experts of `expert_bytes` bytes and dense weights in `dtype`. A profile measured
    in this very format (`measured_format`) is used as it is."""
    if measured_format is not None and measured_format == fmt_name:
        return profile
    bits = 8.0 * expert_bytes / shape.expert_params
    return dataclasses.replace(profile, cpu_bits=bits, gpu_bits=bits, dense_bits=DTYPE_BITS[dtype])


def predict(shape: ModelShape, routing: Routing, budget: DeviceBudget, costs: CostModel,
            prompt_tokens: int, decode_tokens: int, horizon: int = 3) -> Prediction:
    """Simulate `budget.policy` with `budget.slots` cache slots on `routing`."""
    from hybrimoe.sim.bound import phase_bounds
    from hybrimoe.sim.costs import ProfileCosts
    from hybrimoe.sim.prompt import build_workload
    from hybrimoe.sim.simulator import SimConfig, Simulator

    preset = dataclasses.replace(get_preset(budget.policy), cuda_graphs=False)  # as hybrimoe's runtime runs it
    workload = build_workload(routing.trace, prompt_tokens, decode_tokens)
    config = SimConfig(preset, budget.slots / budget.mem.total_experts, horizon=horizon,
                       staging_slots=max(budget.staging_slots, 0))
    sim = Simulator(shape, ProfileCosts(costs, shape), config, routing.warmup)
    result = sim.run(routing.trace, workload)
    bound_ttft = phase_bounds([f for f in sim.forwards if f.phase == "prefill"], sim.phase_costs("prefill"))[0]
    bound_tbt = phase_bounds([f for f in sim.forwards if f.phase == "decode"], sim.phase_costs("decode"))[1]
    return Prediction(result.ttft_seconds, result.tbt_seconds, bound_ttft, bound_tbt, result.hit_rate,
                      result.prompt_tokens, result.decode_steps, list(result.notes) + [routing.warmup_note])
