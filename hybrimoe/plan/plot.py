"""`--plot`: predicted decode tokens/s against the GPU memory each row needs, one line per policy and
expert format (matplotlib PNG), the machine's GPU memory as a vertical line."""

from __future__ import annotations

from hybrimoe.plan.build import PlanResult


def plot_plan(plan: PlanResult, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"bf16": "-", "int8": "--", "int4": ":"}
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in plan.rows:
        p = row.prediction
        if p is None or not p.tbt_seconds:
            continue
        key = (row.budget.policy, row.budget.mem.fmt.name)
        series.setdefault(key, []).append((row.budget.gpu_bytes / 1e9, p.decode_tokens_per_second))
    colors: dict[str, str] = {}
    for (policy, fmt), points in sorted(series.items()):
        points.sort()
        color = colors.setdefault(policy, f"C{len(colors)}")
        ax.plot([x for x, _ in points], [y for _, y in points], styles.get(fmt, "-"), marker="o", color=color,
                label=f"{policy} ({fmt})")
    rec = plan.recommended
    if rec is not None and rec.prediction is not None:
        ax.plot([rec.budget.gpu_bytes / 1e9], [rec.prediction.decode_tokens_per_second], "*", color="black",
                markersize=14, label="recommended")
    ax.axvline(plan.machine.gpu_bytes / 1e9, color="grey", linewidth=1)
    ax.set_xlabel("GPU memory used (GB)")
    ax.set_ylabel("decode tokens/s (predicted)")
    routing = "synthetic routing" if plan.routing and plan.routing.synthetic else "real routing"
    ax.set_title(f"{plan.target.name}: SIMULATED, profile {plan.profile}, {routing}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
