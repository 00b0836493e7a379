"""The recommendation: the fastest row that fits, as the exact `hybrimoe serve` command line.

Sizes are written so that `hybrimoe.runtime_options.parse_bytes` reads them back inside the range the
plan needs: --expert-cache in [S x E_b, (S + 1) x E_b) (so the runtime makes exactly S slots) and
--gpu-memory in [dense + staging + cache, GPU - reserve - KV - transient buffers] (the runtime's own
check then holds the plan's figure; the coarsest unit that does, GB before MB, KB, bytes).
"""

from __future__ import annotations

import math
import shlex
from typing import TYPE_CHECKING

from hybrimoe.moe.quant import DEFAULT_INT4_GROUP
from hybrimoe.policy.presets import get_preset
from hybrimoe.runtime_options import parse_bytes

if TYPE_CHECKING:
    from hybrimoe.plan.build import PlanResult, Row

DEFAULT_STAGING = 4
OBJECTIVES = ("decode", "ttft")


def size_arg(low: int, high: int) -> str:
    """The shortest size string whose parse_bytes value lies in [low, high] (low <= high)."""
    assert 0 <= low <= high, (low, high)
    if high == 0:
        return "0"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        for decimals in range(0, 4):
            value = math.floor(high / scale * 10 ** decimals) / 10 ** decimals
            text = f"{value:.{decimals}f}{unit}"
            if low <= parse_bytes(text) <= high:
                return text
    return str(high)


PREFERRED = ("hybrimoe", "resident")  # on an exact tie (e.g. every expert cached), these first


def sort_key(row: "Row", objective: str = "decode") -> tuple[float, float, float, bool]:
    """Larger is better: decode tokens/s (or -TTFT), then the other, then less GPU memory, then a
    preferred policy."""
    p = row.prediction
    assert p is not None and p.tbt_seconds and p.ttft_seconds is not None
    tps, ttft = 1.0 / p.tbt_seconds, p.ttft_seconds
    first, second = (tps, -ttft) if objective == "decode" else (-ttft, tps)
    return first, second, -row.budget.gpu_bytes, row.budget.policy in PREFERRED


def pick(rows: list["Row"], objective: str = "decode") -> "Row | None":
    candidates = [r for r in rows if r.budget.fits and r.prediction is not None
                  and r.prediction.tbt_seconds and r.prediction.ttft_seconds is not None]
    return max(candidates, key=lambda r: sort_key(r, objective)) if candidates else None


def serve_command(plan: "PlanResult", row: "Row") -> str | None:
    """`hybrimoe serve ...` for `row`; None when the runtime cannot load the model's family."""
    target, machine, budget = plan.target, plan.machine, row.budget
    if target.config is None:
        return None
    mem = budget.mem
    args = ["hybrimoe", "serve", "--model", target.model_arg, "--device", machine.device]
    if machine.dtype != "bf16":
        args += ["--dtype", machine.dtype]
    args += ["--policy", budget.policy, "--expert-dtype", mem.fmt.cli_name]
    if mem.fmt.name == "int4" and mem.fmt.group_size != DEFAULT_INT4_GROUP:
        args += ["--int4-group", str(mem.fmt.group_size)]
    if budget.policy != "resident":
        eb = mem.expert_bytes
        args += ["--expert-cache", size_arg(budget.slots * eb, (budget.slots + 1) * eb - 1)]
    args += ["--gpu-memory", size_arg(budget.runtime_bytes, mem.runtime_gpu_memory(machine))]
    if get_preset(budget.policy).prefetch != "none" and budget.staging_slots != DEFAULT_STAGING:
        args += ["--staging-slots", str(budget.staging_slots)]
    if machine.cpu_kernel != "torch":
        args += ["--cpu-kernel", machine.cpu_kernel]
    if machine.pinned and not mem.pinned:
        args += ["--no-pin-memory"]
    args += ["--max-context", str(machine.context)]
    return " ".join(shlex.quote(a) for a in args)
