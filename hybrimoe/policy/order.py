"""Orderings shared by the schedulers: experts by token count, and in-flight experts worth waiting for."""

from __future__ import annotations

from hybrimoe.policy.plan import ExpertCosts


def by_load_desc(experts, counts: dict[int, int]) -> list[int]:
    """Highest token count first; ties by expert id (deterministic). Two C-level sorts: by id, then
    stably by count (reverse keeps equal counts in id order)."""
    order = sorted(experts)
    order.sort(key=counts.__getitem__, reverse=True)
    return order


def by_load_asc(experts, counts: dict[int, int]) -> list[int]:
    return sorted(experts, key=lambda e: (counts[e], e))


def worth_waiting(counts: dict[int, int], cached: set[int], costs: ExpertCosts,
            arrivals: dict[int, float] | None) -> dict[int, float]:
    """In-flight experts that finish sooner on the GPU after their arrival than on the CPU."""
    return {e: a for e, a in (arrivals or {}).items()
            if e in counts and e not in cached and a + costs.gpu(counts[e]) < costs.cpu(counts[e], False)}
