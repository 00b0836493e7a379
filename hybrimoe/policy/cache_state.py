"""Slot accounting of the GPU expert cache (pure Python; the GPU runtime wraps real slots around it).

`CacheState` knows which `ExpertKey`s are resident, enforces the capacity (in experts: every
routed expert of a model has the same size), asks its `CachePolicy` for victims, never evicts a
pinned expert (the experts the current layer needs), and counts hits, misses, insertions,
evictions and bytes brought in. The budget is global across layers by default; `layer_capacity`
gives each layer its own number of slots instead (what the public HybriMoE code does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from hybrimoe.errors import BudgetError
from hybrimoe.policy.cache_policy import CachePolicy
from hybrimoe.policy.plan import ExpertKey


class CandidateView:
    """The eviction candidates: resident experts of `layers` minus `excluded`. Iterable of keys;
    policies may also read the per-layer sets directly to avoid materialising the keys.
    (A plain slotted class: one is built for every eviction, on the layer's critical path.)"""

    __slots__ = ("by_layer", "layers", "excluded", "versions")

    def __init__(self, by_layer: dict[int, set[int]], layers: list[int], excluded: set[ExpertKey],
                 versions: dict[int, int]) -> None:
        self.by_layer = by_layer
        self.layers = layers
        self.excluded = excluded
        self.versions = versions  # per layer, bumped whenever its resident set changes

    def __iter__(self):
        for layer in self.layers:
            for e in self.by_layer.get(layer, ()):
                if (layer, e) not in self.excluded:
                    yield (layer, e)


@dataclass
class CacheState:
    capacity: int  # experts (global budget); ignored for layers listed in layer_capacity
    policy: CachePolicy
    expert_bytes: int = 0  # bytes of one routed expert, for the bytes counter
    layer_capacity: dict[int, int] | None = None  # per-layer slot budgets instead of a global one
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    bytes_in: int = 0  # bytes copied into cache slots (on-demand admissions and prefetches)
    _resident: set[ExpertKey] = field(default_factory=set)
    _by_layer: dict[int, set[int]] = field(default_factory=dict)
    _pinned: set[ExpertKey] = field(default_factory=set)
    _versions: dict[int, int] = field(default_factory=dict)
    # called after a key becomes resident / stops being resident (the runtime maps slots with them)
    on_add: Callable[[ExpertKey], None] | None = None
    on_remove: Callable[[ExpertKey], None] | None = None

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise BudgetError(f"cache capacity must be >= 0 experts, got {self.capacity}")
        if self.layer_capacity is not None and sum(self.layer_capacity.values()) > self.capacity:
            raise BudgetError(f"per-layer budgets total {sum(self.layer_capacity.values())} experts, "
                              f"more than the cache's {self.capacity}")

    # -- queries -------------------------------------------------------------------------------
    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def cached_experts(self, layer: int) -> set[int]:
        """Experts of `layer` resident now (a copy)."""
        return set(self._by_layer.get(layer, ()))

    def live_layer(self, layer: int) -> set[int] | frozenset[int]:
        """Experts of `layer` resident now: the set itself (read only; `cached_experts` copies)."""
        return self._by_layer.get(layer, frozenset())

    def resident(self) -> set[ExpertKey]:
        return set(self._resident)

    def limit(self, layer: int) -> int:
        """Slots the layer may use (its own budget, or the global one)."""
        if self.layer_capacity is not None:
            return self.layer_capacity.get(layer, 0)
        return self.capacity

    def has_room(self, layer: int) -> bool:
        """Whether the layer's budget has a free slot (an insert would evict nothing)."""
        return self._used(layer) < self.limit(layer)

    def _used(self, layer: int) -> int:
        return len(self._by_layer.get(layer, ())) if self.layer_capacity is not None else len(self._resident)

    def _candidates(self, layer: int, protect: set[ExpertKey]) -> "CandidateView":
        layers = [layer] if self.layer_capacity is not None else list(self._by_layer)
        pinned = self._pinned  # usually within `protect` (the layer's experts): then no new set
        excluded = protect if pinned <= protect else pinned | protect
        return CandidateView(self._by_layer, layers, excluded, self._versions)

    # -- accounting ----------------------------------------------------------------------------
    def access(self, key: ExpertKey) -> bool:
        """Count one activation of `key`: a hit (touches the policy) or a miss."""
        if key in self._resident:
            self.hits += 1
            self.policy.touch(key)
            return True
        self.misses += 1
        return False

    def pin(self, keys: Iterable[ExpertKey]) -> None:
        """Protect `keys` (the current layer's experts) from eviction until `unpin_all`."""
        self._pinned.update(keys)

    def pinned(self) -> set[ExpertKey]:
        return set(self._pinned)

    def unpin_all(self) -> None:
        self._pinned.clear()

    def victim_for(self, key: ExpertKey, protect: Iterable[ExpertKey] = ()) -> ExpertKey | None:
        """The expert that inserting `key` would evict (None if a slot is free or none may go)."""
        layer = key[0]
        if self._used(layer) < self.limit(layer):
            return None
        return self.policy.victim(self._candidates(layer, set(protect)))

    def can_insert(self, key: ExpertKey, protect: Iterable[ExpertKey] = (), by_value: bool = False) -> bool:
        """Whether `insert(key, protect, by_value)` would admit `key`."""
        return self._admission(key, protect, by_value)[0]

    def _admission(self, key: ExpertKey, protect: Iterable[ExpertKey], by_value: bool
                   ) -> tuple[bool, ExpertKey | None]:
        if key in self._resident:
            return False, None
        if self.has_room(key[0]):
            return True, None
        victim = self.victim_for(key, protect)
        if victim is None:
            return False, None
        return (not by_value or self.policy.score(key) > self.policy.score(victim)), victim

    def insert(self, key: ExpertKey, protect: Iterable[ExpertKey] = (), by_value: bool = False) -> bool:
        """Admit `key`, evicting the policy's victim when full; returns whether it was admitted.

        Not admitted when the cache has no evictable slot (all pinned/protected, zero capacity,
        or a static policy), or, with `by_value`, when the victim is worth at least as much.
        """
        admit, victim = self._admission(key, protect, by_value)
        if not admit:
            return False
        layer = key[0]
        if victim is not None:
            assert victim not in self._pinned and victim in self._resident
            self._remove(victim)
            self.evictions += 1
        self._add(key)
        self.inserts += 1
        self.bytes_in += self.expert_bytes
        self.policy.touch(key)
        assert self._used(layer) <= self.limit(layer)
        return True

    def preload(self, keys: Iterable[ExpertKey]) -> None:
        """Fill the cache before the run (not counted as insertions); stops at the capacity.
        `keys` go most valuable first: they are touched in reverse, so for recency policies the
        first key counts as the most recently used."""
        added = []
        for key in keys:
            if key not in self._resident and self._used(key[0]) < self.limit(key[0]):
                self._add(key)
                added.append(key)
        for key in reversed(added):
            self.policy.touch(key)

    def _add(self, key: ExpertKey) -> None:
        self._resident.add(key)
        self._by_layer.setdefault(key[0], set()).add(key[1])
        self._bump(key, True)
        if self.on_add is not None:
            self.on_add(key)

    def _remove(self, key: ExpertKey) -> None:
        self._resident.discard(key)
        self._by_layer[key[0]].discard(key[1])
        self._bump(key, False)
        if self.on_remove is not None:
            self.on_remove(key)

    def _bump(self, key: ExpertKey, added: bool) -> None:
        """A new version of the layer's resident set; policies that keep a sorted view patch it."""
        version = self._versions.get(key[0], 0) + 1
        self._versions[key[0]] = version
        notice = getattr(self.policy, "resident_changed", None)
        if notice is not None:
            notice(key, added, version)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
