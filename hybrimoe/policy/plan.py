"""A MoE layer's execution plan: which expert runs where, in which order, and when.

A `Plan` is plain data (print it, test it, plot it). The simulator executes it on a virtual clock;
the GPU runtime executes the same object on real streams. All times are seconds measured from the
start of the layer's MoE part (the moment the router's output is known).

Three timelines work in parallel:
- "copy": the host->GPU link copies uncached experts one after another (`copies`, in order);
- "gpu":  the GPU computes `gpu_order` one after another; an expert in `copies` cannot start
          before its copy has ended;
- "cpu":  the host computes `cpu_order` one after another from host memory.
The layer is done when both compute timelines are done: `makespan = max(cpu_finish, gpu_finish)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

ExpertKey = tuple[int, int]  # (layer index in the model, expert id)
RESOURCES = ("cpu", "gpu", "copy")


class ExpertCosts(Protocol):
    """Cost of one layer's routed experts, in seconds.

    The simulator builds it from a `CostModel` profile; the runtime from its own calibration.
    """

    def cpu(self, tokens: int, first: bool) -> float:
        """Seconds for the host to compute one expert over `tokens` tokens; `first` = the first
        expert the CPU runs in this layer (slower: weights/activations not yet warm)."""
        ...

    def gpu(self, tokens: int) -> float:
        """Seconds for the GPU to compute one resident expert over `tokens` tokens."""
        ...

    def copy(self) -> float:
        """Seconds to copy one expert's weights host->GPU (bytes / link bandwidth + latency)."""
        ...


@dataclass(frozen=True)
class LinearCosts:
    """A simple `ExpertCosts`: affine in the token count (used by tests and the paper's example).

    cpu(n, first) = cpu_fixed + cpu_per_token * n (+ cpu_first_extra when first)   [s]
    gpu(n)        = gpu_fixed + gpu_per_token * n                                  [s]
    copy()        = copy_seconds                                                   [s]
    """

    cpu_per_token: float
    gpu_fixed: float
    copy_seconds: float
    cpu_fixed: float = 0.0
    cpu_first_extra: float = 0.0
    gpu_per_token: float = 0.0

    def cpu(self, tokens: int, first: bool) -> float:
        return self.cpu_fixed + self.cpu_per_token * tokens + (self.cpu_first_extra if first else 0.0)

    def gpu(self, tokens: int) -> float:
        return self.gpu_fixed + self.gpu_per_token * tokens

    def copy(self) -> float:
        return self.copy_seconds


class Task(NamedTuple):
    """One expert's use of one resource (a named tuple: plans are built on every layer's critical path)."""

    resource: str  # "cpu" | "gpu" | "copy"
    expert: int
    start: float  # seconds from the layer's MoE start
    end: float


@dataclass(frozen=True)
class Plan:
    """Where and in which order one MoE layer's activated experts run, and the predicted timing."""

    layer: int
    gpu_order: tuple[int, ...]  # experts computed on the GPU, execution order
    copies: tuple[int, ...]  # experts copied before their GPU compute, copy order (subset of gpu_order)
    cpu_order: tuple[int, ...]  # experts computed on the host, execution order
    tasks: tuple[Task, ...]
    cpu_finish: float  # seconds from layer start; the CPU's free time if it ran nothing
    gpu_finish: float
    copy_finish: float
    counts: tuple[tuple[int, int], ...] = ()  # (expert, tokens), for printing and plotting

    @property
    def makespan(self) -> float:
        """Seconds until both compute timelines are done."""
        return max(self.cpu_finish, self.gpu_finish)

    def tasks_on(self, resource: str) -> list[Task]:
        return [t for t in self.tasks if t.resource == resource]

    def describe(self) -> str:
        """One line per resource, e.g. `gpu: 3(0.000-0.002) 5(...)`, for logs and the CLI."""
        lines = [f"layer {self.layer}: makespan {self.makespan * 1e3:.3f} ms"]
        for resource in RESOURCES:
            items = " ".join(f"{t.expert}({t.start * 1e3:.3f}-{t.end * 1e3:.3f})" for t in self.tasks_on(resource))
            lines.append(f"  {resource:4s}: {items or '-'}")
        return "\n".join(lines)


def cpu_times(counts: dict[int, int], order: list[int] | tuple[int, ...], costs: ExpertCosts) -> list[float]:
    """Per-expert CPU seconds for experts run in `order` (the first one pays the `first` cost)."""
    return [costs.cpu(counts[e], i == 0) for i, e in enumerate(order)]


def build_plan(layer: int, counts: dict[int, int], gpu_order: list[int] | tuple[int, ...],
               copies: list[int] | tuple[int, ...], cpu_order: list[int] | tuple[int, ...],
               costs: ExpertCosts, copy_free_at: float = 0.0, gpu_free_at: float = 0.0,
               cpu_free_at: float = 0.0, arrivals: dict[int, float] | None = None) -> Plan:
    """Time a given assignment and ordering on the three timelines (no decisions are made here).

    copy i starts when the link is free; GPU expert j starts at max(GPU free, end of its copy, its
    arrival if it is already in flight); the CPU runs its list back to back. `*_free_at` are the
    seconds at which each resource becomes available (e.g. the link still busy with a prefetch);
    `arrivals` {expert: seconds} are copies issued before this layer (prefetches) still in flight.
    """
    assert set(copies) <= set(gpu_order), "every copied expert must be computed on the GPU"
    assert not set(gpu_order) & set(cpu_order), "an expert runs on one device only"
    assert not set(copies) & set(arrivals or ()), "an expert in flight is not copied again"
    tasks: list[Task] = []
    ready: dict[int, float] = dict(arrivals or {})
    t_copy = copy_free_at
    for e in copies:
        start, t_copy = t_copy, t_copy + costs.copy()
        ready[e] = t_copy
        tasks.append(Task("copy", e, start, t_copy))
    t_gpu = gpu_free_at
    for e in gpu_order:
        start = max(t_gpu, ready.get(e, 0.0))
        t_gpu = start + costs.gpu(counts[e])
        tasks.append(Task("gpu", e, start, t_gpu))
    t_cpu = cpu_free_at
    for e, seconds in zip(cpu_order, cpu_times(counts, cpu_order, costs)):
        tasks.append(Task("cpu", e, t_cpu, t_cpu + seconds))
        t_cpu += seconds
    return Plan(layer=layer, gpu_order=tuple(gpu_order), copies=tuple(copies), cpu_order=tuple(cpu_order),
                tasks=tuple(tasks), cpu_finish=t_cpu, gpu_finish=t_gpu,
                copy_finish=max(t_copy, copy_free_at),
                counts=tuple(sorted((e, counts[e]) for e in counts)))


_new_task = tuple.__new__  # Task(*fields) without the named tuple's Python-level __new__


@dataclass(frozen=True)
class PlanTemplate:
    """A Plan with each expert replaced by its position in an ordered candidate list (a scheduler's
    ordering of the layer's experts). Two layers whose candidates match position by position in
    tokens and status get the same decisions and times, so the scheduler plans once per such key and
    instantiates the template with the other layer's expert ids."""

    gpu_order: tuple[int, ...]
    copies: tuple[int, ...]
    cpu_order: tuple[int, ...]
    tasks: tuple[tuple[str, int, float, float], ...]  # (resource, position, start, end)
    cpu_finish: float
    gpu_finish: float
    copy_finish: float

    @classmethod
    def of(cls, plan: Plan, candidates: list[int]) -> "PlanTemplate":
        pos = {e: i for i, e in enumerate(candidates)}
        return cls(tuple(pos[e] for e in plan.gpu_order), tuple(pos[e] for e in plan.copies),
                   tuple(pos[e] for e in plan.cpu_order),
                   tuple((t.resource, pos[t.expert], t.start, t.end) for t in plan.tasks),
                   plan.cpu_finish, plan.gpu_finish, plan.copy_finish)

    def instantiate(self, layer: int, counts: dict[int, int], candidates: list[int]) -> Plan:
        c = candidates
        return Plan(layer=layer, gpu_order=tuple(c[i] for i in self.gpu_order),
                    copies=tuple(c[i] for i in self.copies), cpu_order=tuple(c[i] for i in self.cpu_order),
                    tasks=tuple([_new_task(Task, (r, c[i], start, end)) for r, i, start, end in self.tasks]),
                    cpu_finish=self.cpu_finish, gpu_finish=self.gpu_finish, copy_finish=self.copy_finish,
                    counts=tuple(sorted(counts.items())))
