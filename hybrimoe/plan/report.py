"""A plan as text (memory table, predictions, the command) or as JSON rows (one object per line)."""

from __future__ import annotations

from typing import Any

from hybrimoe.plan.build import PlanResult, Row
from hybrimoe.plan.memory import gb
from hybrimoe.plan.recommend import serve_command


def row_json(plan: PlanResult, row: Row) -> dict[str, Any]:
    b, p, m = row.budget, row.prediction, row.budget.mem
    routing = plan.routing
    return {
        "model": plan.target.name, "policy": b.policy, "expert_dtype": m.fmt.describe(), "cache": row.cache,
        "cache_slots": b.slots, "cache_ratio": round(b.ratio, 6), "cache_bytes": b.cache_bytes,
        "staging_slots": b.staging_slots,
        "ttft_seconds": p.ttft_seconds if p else None,
        "decode_tokens_per_second": p.decode_tokens_per_second if p else None,
        "tbt_seconds": p.tbt_seconds if p else None,
        "bound_ttft_seconds": p.bound_ttft_seconds if p else None,
        "bound_decode_tokens_per_second": (1.0 / p.bound_tbt_seconds) if p and p.bound_tbt_seconds else None,
        "hit_rate": p.hit_rate if p else None,
        "gpu_bytes": b.gpu_bytes, "gpu_memory": plan.machine.gpu_bytes,
        "host_bytes": m.host_bytes, "host_memory": plan.machine.host_bytes, "pinned": m.pinned,
        "cpu_kernel_copy_bytes": m.kernel_bytes, "cpu_kernel": plan.machine.cpu_kernel,
        "dense_bytes": m.dense_bytes, "kv_bytes": m.kv_bytes, "transient_bytes": m.transient_bytes,
        "reserve_bytes": b.reserve_bytes, "expert_bytes": m.expert_bytes, "store_bytes": m.store_bytes,
        "memory_estimated": m.estimated, "fits": b.fits, "reason": b.reason or None,
        "recommended": row.recommended, "command": serve_command(plan, row) if b.fits else None,
        "routing": routing.label if routing else None, "synthetic": bool(routing and routing.synthetic),
        "profile": plan.profile, "simulated": True, "context": plan.machine.context,
        "prompt_tokens": p.prompt_tokens if p else plan.prompt_tokens,
        "decode_steps": p.decode_steps if p else 0,
    }


def _s(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def text_report(plan: PlanResult) -> list[str]:
    t, mach = plan.target, plan.machine
    out = [f"hybrimoe plan: {t.name} ({t.shape.num_layers} layers, {len(t.shape.moe_layers)} MoE x "
           f"{t.shape.num_experts} experts, top-{t.shape.top_k}) on GPU {gb(mach.gpu_bytes)} ({mach.device}), "
           f"host {gb(mach.host_bytes)}, context {mach.context} tokens",
           "", "Memory (GB = 1e9 bytes; the runtime's own accounting" +
           (", dense part ESTIMATED from the shape)" if t.config is None else ": hybrimoe.moe.budget)")]
    m0 = plan.memory[0]
    out.append(f"  GPU, every format: dense {gb(m0.dense_bytes)} + KV cache {gb(m0.kv_bytes)} + reserve "
               f"{gb(mach.reserve_bytes)}, plus 2 transient expert buffers, staging slots and the expert cache")
    out.append(f"  {'format':15s} {'expert MB':>9s} {'host store':>11s} {'host':>5s} {'largest cache (hybrimoe)':>26s}")
    for m in plan.memory:
        best = next((r.budget for r in plan.rows if r.budget.mem is m and r.cache == "largest"
                     and r.budget.policy == "hybrimoe"), None)
        cache = "-" if best is None or not best.fits else f"{best.slots} ({best.ratio:.0%}, {gb(best.cache_bytes)})"
        host = "ok" if m.host_fits else "NO"
        out.append(f"  {m.fmt.describe():15s} {m.expert_bytes / 1e6:9.2f} {gb(m.host_bytes):>8s}{' p' if m.pinned else '  '}"
                   f" {host:>5s} {cache:>26s}" + (f"  + {plan.machine.cpu_kernel} copy {gb(m.kernel_bytes)}" if m.kernel_bytes else ""))
    if not any(r.prediction for r in plan.rows):
        out += ["", "Nothing fits:"] + [f"  {r.budget.policy:13s} {r.budget.mem.fmt.describe():15s} {r.budget.reason}"
                                        for r in plan.rows]
        return out
    routing = plan.routing
    out += ["", f"Predictions (SIMULATED with profile {plan.profile}; routing: {routing.label}; prompt "
                f"{plan.prompt_tokens} tokens, {plan.decode_tokens} decode steps; eager, as hybrimoe runs)",
            f"  {'policy':13s} {'format':15s} {'cache':>7s} {'experts':>8s} {'ratio':>6s} {'GPU GB':>7s} "
            f"{'TTFT s':>7s} {'tok/s':>7s} {'bound':>7s} {'hit':>5s}"]
    for r in sorted(plan.rows, key=lambda r: (r.prediction is None, r.budget.mem.fmt.name, r.budget.policy,
                                               -r.budget.slots)):
        b, p = r.budget, r.prediction
        if p is None:
            out.append(f"  {b.policy:13s} {b.mem.fmt.describe():15s} {'':>7s} does not fit: {b.reason}")
            continue
        bound = 1.0 / p.bound_tbt_seconds if p.bound_tbt_seconds else None
        out.append(f"  {b.policy:13s} {b.mem.fmt.describe():15s} {r.cache:>7s} {b.slots:8d} {b.ratio:6.0%} "
                   f"{b.gpu_bytes / 1e9:7.1f} {_s(p.ttft_seconds):>7s} {_s(p.decode_tokens_per_second, '{:.1f}'):>7s} "
                   f"{_s(bound, '{:.1f}'):>7s} {p.hit_rate:5.2f}{'  <- recommended' if r.recommended else ''}")
    out.append("  bound = decode tok/s no schedule with that row's cache content can beat (computed lower bound)")
    rec = plan.recommended
    if rec is not None and rec.prediction is not None:
        p = rec.prediction
        out += ["", f"Recommended (fastest {'decode' if plan.objective == 'decode' else 'time to first token'} that "
                    f"fits): {rec.budget.policy}, {rec.budget.mem.fmt.describe()} experts, cache {rec.budget.slots} "
                    f"experts: {p.decode_tokens_per_second:.1f} tok/s, TTFT {p.ttft_seconds:.2f} s (simulated)"]
        out.append(f"  {plan.command}" if plan.command else "  (no serve command: see the notes)")
        if rec.budget.mem.fmt.quantized:
            out.append("  int8/int4 experts change the model's numbers a little (benchmarks/RESULTS_formats.md); "
                       "--expert-dtype bf16 keeps the checkpoint's weights")
    if plan.machine.cpu_kernel != "torch" and not plan.profile.startswith("measured"):
        plan.notes.append(f"--cpu-kernel {plan.machine.cpu_kernel}: the CPU side's speed is the profile's, not this "
                          "kernel's; --calibrate --cpu-kernel ... measures it here")
    if routing.synthetic:
        plan.notes.append("the routing is SYNTHETIC: no trace of this model; pass --trace FILE (hybrimoe generate "
                          "--record-trace) for its real routing")
    notes = plan.notes + sorted({n for r in plan.rows if r.prediction for n in r.prediction.notes if n})
    return out + ([""] + [f"note: {n}" for n in notes] if notes else [])
