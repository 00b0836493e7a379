"""The host->GPU copy link as one FIFO queue across layers (pure Python; absolute seconds).

Every copy, whatever asked for it, goes through one `LinkQueue`: this layer's on-demand copies,
prefetches for later layers, and fills of CPU-computed misses into the cache. The link copies one
expert after another in the order copies are issued; a copy may still be in flight when the next
layer starts (it crosses the layer boundary), and that layer's plan then knows when it arrives.

Where a copied expert lands:
- "slot": a cache slot (`CacheState.insert` at issue time: the expert counts as resident from then
  on, and the queue remembers its arrival until it has landed);
- "staging": one of `staging_slots` device buffers for a prefetched expert the cache does not keep
  (a static cache, or a dynamic one whose victims are all protected). A staged expert is held
  until its layer has run in the current forward, then the buffer is free again;
- "transient": an on-demand copy used once by the current layer and dropped (the runtime's two
  transient buffers; prefill copies that would evict go there).

The simulator drives it with its virtual clock, the runtime with `time.perf_counter()` and the
cost model's copy seconds (the CUDA events remain the truth for correctness: an estimate that is
off changes decisions, never results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from hybrimoe.policy.plan import ExpertKey

DESTINATIONS = ("slot", "staging", "transient")
KINDS = ("demand", "prefetch", "fill")


class Copy(NamedTuple):
    """One copy on the link (a named tuple: built on every layer's critical path)."""

    key: ExpertKey
    kind: str  # demand | prefetch | fill
    dest: str  # slot | staging | transient
    start: float  # absolute seconds
    end: float  # absolute seconds: the expert has arrived


@dataclass
class LinkQueue:
    staging_slots: int = 4  # device buffers for prefetched experts the cache does not keep
    free_at: float = 0.0  # absolute seconds at which the last issued copy ends
    log: list[Copy] | None = None  # set to [] to keep every copy in issue (= link) order
    copies: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})  # issued, per kind
    seconds: float = 0.0  # link busy seconds issued so far
    _arrival: dict[ExpertKey, float] = field(default_factory=dict)  # slot or staged copies not yet used
    _staged: dict[ExpertKey, Copy] = field(default_factory=dict)  # keys held in staging buffers

    def __post_init__(self) -> None:
        if self.staging_slots < 0:
            raise ValueError(f"staging slots must be >= 0, got {self.staging_slots}")

    # -- issuing -------------------------------------------------------------------------------
    def issue(self, key: ExpertKey, kind: str, dest: str, now: float, seconds: float) -> Copy:
        """Queue one copy of `seconds` behind everything issued before; returns it with its times."""
        assert kind in KINDS and dest in DESTINATIONS, (kind, dest)
        assert dest != "staging" or self.staging_free() > 0, "no free staging buffer"
        start = max(now, self.free_at)
        copy = Copy(key, kind, dest, start, start + seconds)
        self.free_at = copy.end
        self.copies[kind] += 1
        self.seconds += seconds
        if self.log is not None:
            self.log.append(copy)
        if dest != "transient":
            self._arrival[key] = copy.end
        if dest == "staging":
            self._staged[key] = copy
        return copy

    def start_of_next(self, now: float) -> float:
        """When a copy issued now would start."""
        return max(now, self.free_at)

    # -- queries ---------------------------------------------------------------------------------
    def staging_free(self) -> int:
        return self.staging_slots - len(self._staged)

    def staged(self, key: ExpertKey) -> bool:
        return key in self._staged

    def staged_keys(self) -> set[ExpertKey]:
        return set(self._staged)

    def live_views(self) -> tuple[dict[ExpertKey, Copy], dict[ExpertKey, float]]:
        """The staged copies and the pending arrivals themselves (read only: for per-layer scans on
        the critical path, without a call per key)."""
        return self._staged, self._arrival

    def arrival(self, key: ExpertKey) -> float | None:
        """Absolute arrival of a slot or staging copy of `key` not yet used (None: none pending)."""
        return self._arrival.get(key)

    # -- the end of a layer ------------------------------------------------------------------------
    def layer_done(self, layer: int) -> list[ExpertKey]:
        """The layer has run: its staged experts leave their buffers (used or mispredicted) and its
        pending arrivals are forgotten. Returns the keys whose staging buffers were freed."""
        freed = [k for k in self._staged if k[0] == layer]
        for k in freed:
            del self._staged[k]
        for k in [k for k in self._arrival if k[0] == layer]:
            del self._arrival[k]
        return freed
