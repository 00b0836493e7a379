"""`make_plan`: memory per expert format, predictions per (policy, format, cache), the recommendation.

Rows: every policy at the largest cache that fits, in every expert format whose store fits the host;
then, in the format of the best of those, every cache-keeping policy at 1/2 and 1/4 of its largest
cache (what less GPU memory would give; the plot's points). The simulation is limited to
`prompt_tokens` (one prefill forward) and `decode_tokens` decode forwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from hybrimoe.errors import BudgetError
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.plan.memory import DeviceBudget, FormatMemory, Machine, device_budget, format_memory, gb
from hybrimoe.plan.predict import Prediction, predict
from hybrimoe.plan.recommend import pick, serve_command
from hybrimoe.plan.routing import Routing, choose_routing
from hybrimoe.plan.target import Target
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.presets import get_preset

log = logging.getLogger(__name__)

DEFAULT_POLICIES = ("hybrimoe", "ktransformers", "llamacpp", "fiddler", "resident")
DEFAULT_FORMATS = ("bf16", "int8", "int4")
SMALLER_CACHES = (2, 4)  # divisors of the largest cache for the extra rows


@dataclass
class Row:
    budget: DeviceBudget
    prediction: Prediction | None
    cache: str  # "largest" | "1/2" | "1/4"
    recommended: bool = False


@dataclass
class PlanResult:
    target: Target
    machine: Machine
    profile: str  # cost profile name ("measured on ..." for --calibrate)
    memory: list[FormatMemory]
    rows: list[Row]
    routing: Routing | None  # None when nothing fits (nothing simulated)
    prompt_tokens: int
    decode_tokens: int
    objective: str
    recommended: Row | None = None
    command: str | None = None
    notes: list[str] = field(default_factory=list)

    def refusal(self) -> str:
        """One line: why nothing runs, and by how much for the closest format."""
        rows = [r for r in self.rows if not r.budget.fits]
        host = [m for m in self.memory if not m.host_fits]
        if len(host) == len(self.memory):
            m = min(host, key=lambda m: m.host_bytes - m.host_available)
            return (f"{self.target.name} does not fit this machine in any expert format: even {m.fmt.describe()} "
                    f"experts take {gb(m.host_bytes)} of host memory{' (pinned)' if m.pinned else ''}, "
                    f"{gb(m.host_bytes - m.host_available)} more than {gb(m.host_available)}")
        fitting = [r for r in rows if r.budget.mem.host_fits]
        best = min(fitting, key=lambda r: r.budget.runtime_bytes - r.budget.mem.runtime_gpu_memory(self.machine))
        return f"{self.target.name} does not fit this machine with any policy or expert format: {best.budget.reason}"


def make_plan(target: Target, machine: Machine, costs_for: Callable[[FormatMemory], CostModel], profile: str,
              formats: tuple[str, ...] = DEFAULT_FORMATS, policies: tuple[str, ...] = DEFAULT_POLICIES,
              prompt_tokens: int = 512, decode_tokens: int = 16, trace_file: str | None = None,
              int4_group: int | None = None, staging: int = 4, objective: str = "decode",
              seed: int = 0, sweep: bool = True) -> PlanResult:
    """`sweep`: also the 1/2 and 1/4 caches in the best format (the plot's points)."""
    for name in policies:
        get_preset(name)  # an unknown name fails before any work
    memory = [format_memory(target, ExpertFormat.parse(f, machine.torch_dtype, int4_group), machine)
              for f in formats]
    budgets = [device_budget(target, m, machine, p, staging=staging) for m in memory for p in policies]
    plan = PlanResult(target, machine, profile, memory, [], None, prompt_tokens, decode_tokens, objective)
    if not any(b.fits for b in budgets):
        plan.rows = [Row(b, None, "largest") for b in budgets]
        return plan
    plan.routing = choose_routing(target.shape, trace_file, prompt_tokens, decode_tokens, seed)
    todo = sum(b.fits for b in budgets)
    done = 0

    def run(budget: DeviceBudget, cache: str) -> Row:
        nonlocal done
        if not budget.fits:
            return Row(budget, None, cache)
        done += 1
        log.info("[%d/%d] simulating %s, %s experts, cache %d experts (%.0f%%)", done, todo, budget.policy,
                 budget.mem.fmt.describe(), budget.slots, 100 * budget.ratio)
        prediction = predict(target.shape, plan.routing, budget, costs_for(budget.mem), prompt_tokens, decode_tokens)
        return Row(budget, prediction, cache)

    plan.rows = [run(b, "largest") for b in budgets]
    best = pick(plan.rows, objective)
    if best is not None and sweep:
        extra = []
        for row in plan.rows:
            b = row.budget
            if b.mem is not best.budget.mem or not b.fits or get_preset(b.policy).initial == "all":
                continue
            for div in SMALLER_CACHES:
                slots = b.slots // div
                if slots < 1 or slots == b.slots:
                    continue
                extra.append((device_budget(target, b.mem, machine, b.policy, slots=slots, staging=staging), div))
        todo += len(extra)
        plan.rows += [run(b, f"1/{div}") for b, div in extra]
    plan.recommended = pick(plan.rows, objective)
    if plan.recommended is not None:
        plan.recommended.recommended = True
        plan.command = serve_command(plan, plan.recommended)
    if target.config is None:
        plan.notes.append(f"hybrimoe's runtime cannot load this model ({target.unsupported}): memory is estimated "
                          "from the shape and there is no serve command")
    if any(m.pinned for m in memory):
        plan.notes.append("host: a pinned store takes the next power of two of its bytes (torch's caching host "
                          "allocator); --no-pin-memory avoids that at the cost of pageable copies")
    if machine.pinned and any(m.host_fits and not m.pinned for m in memory):
        plan.notes.append("formats whose store fits only unpinned run with --no-pin-memory: copies from pageable "
                          "memory are slower than the profile's pinned copy rate, so their figures are optimistic")
    return plan


def check_fits(plan: PlanResult) -> None:
    """BudgetError (one line, with by how much) when nothing fits."""
    if not any(r.budget.fits for r in plan.rows):
        raise BudgetError(plan.refusal())
