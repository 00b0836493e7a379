"""Results of one simulated run, and the timeline records the Gantt plot draws."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Span:
    """One busy interval on one resource, in seconds from the start of its step."""

    resource: str  # "cpu" | "gpu" | "copy"
    layer: int
    expert: int  # -1 for dense GPU work (attention, shared experts, LM head)
    start: float
    end: float
    kind: str  # "expert" | "dense" | "copy" | "prefetch" | "fill"


@dataclass(frozen=True)
class LayerLog:
    """What one MoE layer of one forward needed, and which of it was already on the GPU side."""

    layer: int
    counts: dict[int, int]  # {expert: tokens routed to it in this forward}
    resident: frozenset[int]  # activated experts landed on the GPU side (cache slot or staging) at access


@dataclass
class ForwardLog:
    """One simulated forward, as the bound (hybrimoe.sim.bound) needs it."""

    phase: str  # "prefill" | "decode"
    tokens: int  # new tokens of the forward
    context: int  # tokens already in the KV cache
    dense_seconds: float  # sum of dense GPU work of every layer + LM head
    seconds: float  # simulated duration of the forward under the policy
    layers: list[LayerLog] = field(default_factory=list)
    # layer of every expert that had landed on the GPU side by its access in this forward but was not
    # there when the forward began: holding it took one whole copy over the link within the forward
    entered: list[int] = field(default_factory=list)


@dataclass
class SimResult:
    policy: str
    cache_ratio: float
    cache_slots: int  # experts the GPU cache holds
    prompt_tokens: int
    decode_steps: int
    ttft_seconds: float | None  # prefill forward incl. LM head; None without a prefill
    tbt_seconds: float | None  # mean decode forward = time between two tokens of a sequence; None: no decode
    hit_rate: float  # all activations (in a prompt or a batched decode step: one per expert of a layer)
    prefill_hit_rate: float | None
    decode_hit_rate: float | None
    bytes_copied: int  # on-demand + prefetch + fill copies over the link
    prefetch_copies: int
    prefetch_useful: int  # prefetched experts used before being evicted
    cpu_busy: float  # fraction of simulated time the resource was busy
    gpu_busy: float
    link_busy: float
    predictor: str  # which predictions the prefetcher got ("none" when it does not prefetch)
    total_seconds: float
    trace: str = ""
    model: str = ""
    profile: str = ""
    notes: list[str] = field(default_factory=list)
    # lower bounds (hybrimoe.sim.bound) for the cache content THIS run held; None: not computed
    bound_ttft_seconds: float | None = None  # of the prefill forward
    bound_tbt_seconds: float | None = None  # mean over the decode forwards
    batch: int = 1  # sequences per decode step (each step carries one token of each)
    decode_tokens_per_second: float | None = None  # batch * decode steps / decode seconds (all sequences)

    def row(self) -> dict:
        """JSON-friendly dict (one line of `hybrimoe simulate --json`)."""
        return asdict(self)
