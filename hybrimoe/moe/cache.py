"""GPU expert cache: a fixed pool of device slots holding routed experts, plus transient staging buffers.

    pool     [S, numel]  on the compute device; slot s holds one expert laid out like the host store
                         (its format's bytes: [gate | up | down], or int8/int4 codes and scales), so
                         filling it is ONE copy of the expert's host buffer.
    staging  [B, numel]  (B = 2, allocated on first use) for an on-demand expert the plan sends to the GPU
                         but the cache may not keep (zero capacity, every slot pinned, or a static
                         policy that refuses it); it is copied, used once and dropped.
    prefetch [P, numel]  (P = staging_slots, on first use) for a PREFETCHED expert the cache does not keep
                         (hybrimoe.policy.link): held from its copy until its layer has run.
                         Reuse of any staging buffer waits for the main stream to finish with its
                         previous occupant (an event).

Which expert sits in which slot is this file's business; which experts are resident, the capacity
(global or per layer), victims, and the hit/miss/bytes counters are `hybrimoe.policy.CacheState`'s,
driven by a `CachePolicy` (mrs, lru, lfu, static). This class adds per-layer counters and asserts
that slots and accounting agree (never more experts than slots, one slot per resident expert).
On the CPU fallback the pool is a host tensor and copies are host copies: the same code path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hybrimoe.moe.devices import Devices
from hybrimoe.moe.kernels import ExpertView
from hybrimoe.moe.store import ExpertStore
from hybrimoe.policy.cache_state import CacheState
from hybrimoe.policy.plan import ExpertKey

log = logging.getLogger(__name__)

STAGING_BUFFERS = 2


@dataclass
class LayerCounters:
    hits: int = 0  # activated experts found resident when the layer was planned
    misses: int = 0  # activated experts not resident
    inserts: int = 0  # experts copied into a cache slot
    staged: int = 0  # experts copied into a transient staging buffer (not kept)
    bytes_copied: int = 0  # host->device bytes for this layer (slots + staging)


class GpuExpertCache:
    """Slots for `state.capacity` experts (or the sum of per-layer capacities) on `devices.compute`."""

    def __init__(self, store: ExpertStore, devices: Devices, state: CacheState, staging_slots: int = 0) -> None:
        self.store = store
        self.devices = devices
        self.state = state
        slots = sum(state.layer_capacity.values()) if state.layer_capacity is not None else state.capacity
        total = len(store.layers) * store.config.num_experts
        self.num_slots = min(slots, total)  # more slots than experts would never be used
        self.pool = torch.empty(self.num_slots, store.expert_numel, dtype=store.dtype,
                                device=devices.compute)  # [S, numel]
        self._slot_of: dict[ExpertKey, int] = {}
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._staging: list[torch.Tensor] = []
        self._staging_release: list[Any] = []  # main-stream event after the last use, per buffer
        self._next_staging = 0
        self.layers: dict[int, LayerCounters] = {layer: LayerCounters() for layer in store.layers}
        self._pending: dict[ExpertKey, Any] = {}  # copy-done event of a slot not yet waited for by the main stream
        self.freeze_admitted = False  # static policy: every admitted expert joins the never-evicted hot set
        # (first-use fill of free slots when no warm-up trace gave a hot set; then the set never changes)
        self.staging_slots = staging_slots
        self._prefetch_buffers: list[torch.Tensor] = []  # [3*I*H] each, allocated on first use
        self._prefetch_release: list[Any] = []  # main-stream event after the last read, per buffer
        self._staged: dict[ExpertKey, int] = {}  # prefetched expert -> buffer index
        # every insertion or eviction of the accounting (this class, the copy pipeline) maps slots here
        state.on_add, state.on_remove = self._slot_taken, self._slot_freed
        log.info("expert cache: %d slots x %.1f MB on %s (%s)", self.num_slots, store.expert_nbytes / 1e6,
                 devices.compute, "per layer" if state.layer_capacity is not None else "global")

    # -- queries -------------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.store.expert_nbytes


    def cached_experts(self, layer: int) -> set[int]:
        return self.state.cached_experts(layer)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    def weights(self, key: ExpertKey) -> ExpertView:
        """The resident expert as a computable view of its slot (on the compute device; quantised formats
        are computed from the copied bytes: see hybrimoe.moe.kernels)."""
        return self.store.view(self.pool[self._slot_of[key]])

    # -- one layer -----------------------------------------------------------------------------
    def begin_layer(self, layer: int, experts: Iterable[int]) -> set[int]:
        """Counts the layer's activations (hit/miss), pins them against eviction; returns the cached ones."""
        counters = self.layers[layer]
        cached = set()
        for e in experts:
            if self.state.access((layer, e)):
                counters.hits += 1
                cached.add(e)
            else:
                counters.misses += 1
        self.state.pin((layer, e) for e in cached)
        return cached

    def end_layer(self) -> None:
        self.state.unpin_all()

    def slot(self, key: ExpertKey) -> torch.Tensor:
        """The slot tensor [3*I*H] of a resident expert."""
        return self.pool[self._slot_of[key]]

    def _slot_taken(self, key: ExpertKey) -> None:
        """CacheState made `key` resident: give it a free slot (its victim, if any, was freed first)."""
        assert self._free, f"no free slot for {key}: {len(self._slot_of)} of {self.num_slots} used"
        self._slot_of[key] = self._free.pop()
        if self.freeze_admitted:  # a new StaticPolicy with the key in its never-evicted set (public API only)
            policy: Any = self.state.policy
            self.state.policy = type(policy)(hot=set(policy.hot) | {key}, frequency=policy.frequency)

    def _slot_freed(self, key: ExpertKey) -> None:
        self._free.append(self._slot_of.pop(key))
        self._pending.pop(key, None)

    def copy_into_slot(self, key: ExpertKey, slot: torch.Tensor | None = None) -> Any:
        """Issue the host->slot copy of `key` (call inside `devices.copy_context()`); returns the copy-done
        event, which the main stream must wait for before reading the slot (see `take_pending`)."""
        slot = self.slot(key) if slot is None else slot
        slot.copy_(self.store.buffer(*key), non_blocking=True)
        event = self.devices.record_copy()
        if event is not None:
            self._pending[key] = event
        counters = self.layers[key[0]]
        counters.inserts += 1
        counters.bytes_copied += self.store.expert_nbytes
        self.check(layer=key[0] if self.state.layer_capacity is not None else None)
        return event

    def take_pending(self, key: ExpertKey) -> Any:
        """The copy event of `key` not yet waited for (None if none): a slot filled in an earlier layer
        (fill_misses, prefetch) may still be in flight when the expert is next used from the cache."""
        return self._pending.pop(key, None)

    def staging_buffer(self, layer: int) -> torch.Tensor:
        """A transient buffer [numel] for an expert the cache does not keep. The copy stream waits
        (on CUDA) until the main stream is done with the buffer's previous occupant; call
        `release_staging(buffer)` after issuing the compute that reads it."""
        if len(self._staging) < STAGING_BUFFERS:
            self._staging.append(torch.empty(self.store.expert_numel, dtype=self.store.dtype,
                                             device=self.devices.compute))
            self._staging_release.append(None)
        index = self._next_staging % len(self._staging)
        self._next_staging += 1
        self.devices.copy_waits(self._staging_release[index])
        counters = self.layers[layer]
        counters.staged += 1
        counters.bytes_copied += self.store.expert_nbytes
        return self._staging[index]

    def release_staging(self, buffer: torch.Tensor) -> None:
        for i, b in enumerate(self._staging):
            if b is buffer:
                self._staging_release[i] = self.devices.record_main()
                return
        raise AssertionError("not a staging buffer")

    def preload(self, keys: Iterable[ExpertKey]) -> list[tuple[ExpertKey, torch.Tensor]]:
        """Fill free slots before the run (e.g. a static hot set); returns (key, slot) to copy into."""
        before = self.state.resident()
        self.state.preload(keys)
        out = [(key, self.slot(key)) for key in sorted(self.state.resident() - before)]
        self.check(full=True)
        return out

    # -- prefetch staging: experts copied for a later layer that the cache does not keep ------------
    def stage(self, key: ExpertKey) -> torch.Tensor:
        """A free prefetch staging buffer [3*I*H] for `key` (call inside `devices.copy_context()`, then
        copy and `record_staged`); the copy stream first waits until the main stream has finished
        reading the buffer's previous occupant."""
        used = set(self._staged.values())
        free = [i for i in range(len(self._prefetch_buffers)) if i not in used]
        if free:
            index = free[0]
        else:
            assert len(self._prefetch_buffers) < self.staging_slots, "no free prefetch staging buffer"
            self._prefetch_buffers.append(torch.empty(self.store.expert_numel, dtype=self.store.dtype,
                                                      device=self.devices.compute))
            self._prefetch_release.append(None)
            index = len(self._prefetch_buffers) - 1
        self.devices.copy_waits(self._prefetch_release[index])
        self._staged[key] = index
        counters = self.layers[key[0]]
        counters.staged += 1
        counters.bytes_copied += self.store.expert_nbytes
        buffer = self._prefetch_buffers[index]
        buffer.copy_(self.store.buffer(*key), non_blocking=True)
        event = self.devices.record_copy()
        if event is not None:
            self._pending[key] = event
        return buffer

    def staged_weights(self, key: ExpertKey) -> ExpertView | None:
        """The prefetch staging buffer holding `key` as a computable view, or None if it is not staged."""
        index = self._staged.get(key)
        if index is None:
            return None
        return self.store.view(self._prefetch_buffers[index])

    def unstage(self, keys: Iterable[ExpertKey]) -> None:
        """The keys' layer has run: their buffers are free once the main stream is done reading them."""
        for key in keys:
            index = self._staged.pop(key, None)
            if index is not None:
                self._prefetch_release[index] = self.devices.record_main()
                self._pending.pop(key, None)

    def release(self) -> None:
        """Free the device memory of slots and staging buffers now (the cache is unusable afterwards)."""
        self.devices.synchronize()
        self.state.on_add = self.state.on_remove = None
        self.pool = self.pool.new_empty(0, self.store.expert_numel)
        self._staging, self._staging_release, self._pending = [], [], {}
        self._prefetch_buffers, self._prefetch_release, self._staged = [], [], {}
        self._slot_of, self._free, self.num_slots = {}, [], 0
        self.state.capacity, self.state.layer_capacity = 0, None
        for key in self.state.resident():
            self.state._remove(key)

    # -- invariants and counters ----------------------------------------------------------------
    def check(self, full: bool = False, layer: int | None = None) -> None:
        """Slots and accounting agree; never more experts than slots or than the budget.
        O(1) by default (every admission runs it); `full` also compares the key sets and every layer."""
        assert len(self._slot_of) == len(self.state) <= self.num_slots, (len(self._slot_of), len(self.state))
        assert len(self._free) + len(self._slot_of) == self.num_slots
        if self.state.layer_capacity is None:
            assert len(self.state) <= self.state.capacity
        for checked in (self.layers if full else () if layer is None else (layer,)):
            assert len(self.state.cached_experts(checked)) <= self.state.limit(checked)
        if full:
            assert set(self._slot_of) == self.state.resident()
            assert len(set(self._slot_of.values())) == len(self._slot_of), "two experts share a slot"

    def counters(self) -> dict[str, Any]:
        """Totals and per-layer counters: hits, misses, hit_rate, inserts, staged, bytes_copied."""
        total = LayerCounters()
        for c in self.layers.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(c, name))
        seen = total.hits + total.misses
        return {"slots": self.num_slots, "resident": len(self._slot_of), "capacity_bytes": self.capacity_bytes,
                **vars(total), "hit_rate": total.hits / seen if seen else 0.0,
                "evictions": self.state.evictions,
                "per_layer": {layer: dict(vars(c)) for layer, c in self.layers.items()}}
