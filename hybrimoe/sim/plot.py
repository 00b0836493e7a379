"""Matplotlib figures: Gantt timeline of one forward (CPU / GPU / PCIe rows), speedup and hit-rate bars."""

from __future__ import annotations

import os
from typing import Sequence

from hybrimoe.sim.metrics import Span

ROWS = ("cpu", "gpu", "copy")
ROW_LABEL = {"cpu": "CPU", "gpu": "GPU", "copy": "PCIe"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(spans: Sequence[Span], path: str | os.PathLike, title: str = "") -> None:
    """One row per resource; colour per layer; dense GPU work grey; prefetch/fill copies hatched.
    Times in milliseconds from the start of the forward."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(12, 2.8))
    for span in spans:
        row = 2 - ROWS.index(span.resource)
        colour = "#bbbbbb" if span.kind == "dense" else cmap(span.layer % 20)
        hatch = "//" if span.kind in ("prefetch", "fill") else None
        ax.broken_barh([(span.start * 1e3, max((span.end - span.start) * 1e3, 1e-6))], (row - 0.4, 0.8),
                       facecolors=colour, edgecolor="black" if hatch else "white", linewidth=0.3, hatch=hatch)
    ax.set_yticks([2, 1, 0], [ROW_LABEL[r] for r in ROWS])
    ax.set_xlabel("time in the forward [ms] (colour = layer, grey = dense GPU work, hatched = prefetch/fill copy)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(groups: Sequence[str], series: dict[str, Sequence[float]], path: str | os.PathLike,
              ylabel: str, title: str = "", reference: float | None = None) -> None:
    """Grouped bars: one group per label in `groups`, one bar per series; optional horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) / 2), 3.4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(series), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
