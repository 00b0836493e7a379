"""MRS's eviction order kept incrementally: per layer the residents sorted by stored score, and per
layer its lowest resident's S ("head"), so that a victim over all layers is one `min` over the heads.

MRS stores S = scale[layer] * raw[layer][e] (lazy decay, cache_policy.MRSPolicy). Within a layer the
order by raw is the order by S (scale > 0), so a layer's sorted list changes only when a resident is
added or removed, or a resident's raw value changes (observe); its head's S changes also when the
layer's scale decays (observe). Every such event refreshes that layer's head here; a victim query
costs one C-level `min` over the heads plus a short walk for the few layers whose head is excluded
(the current layer's pinned experts, protected prefetches). The victim is exactly the definition's:
the lowest (S, layer, expert) among the candidates (tests compare it with a brute-force minimum).

A layer whose list is unknown (never built, or invalidated: scale folded, notices out of step) is
"dirty" and re-sorted at the next query that may need it.
"""

from __future__ import annotations

import bisect
from typing import Callable

from hybrimoe.policy.plan import ExpertKey

Head = tuple[float, int, int]  # (S, layer, expert) of a layer's lowest resident


class SortedResidents:
    def __init__(self) -> None:
        self.orders: dict[int, tuple[int, list[tuple[float, int]]]] = {}  # layer -> (version, sorted (raw, e))
        self.heads: dict[int, Head] = {}
        self.dirty: set[int] = set()
        self._versions: object = None  # the CacheState's versions dict the orders are in step with

    # -- events --------------------------------------------------------------------------------
    def invalidate(self, layer: int) -> None:
        self.orders.pop(layer, None)
        self.heads.pop(layer, None)
        self.dirty.add(layer)

    def raw_changed(self, layer: int, e: int, old: float, new: float) -> None:
        """An expert's stored raw score went from `old` to `new` (resident or not)."""
        cached = self.orders.get(layer)
        if cached is None:
            return
        lst = cached[1]
        i = bisect.bisect_left(lst, (old, e))
        if i < len(lst) and lst[i] == (old, e):  # a resident: O(log n) find, O(n) move
            del lst[i]
            bisect.insort(lst, (new, e))

    def refresh_head(self, layer: int, scale: float) -> None:
        """Recomputes the layer's head after its list or its scale changed."""
        cached = self.orders.get(layer)
        if cached is None:
            return
        if cached[1]:
            raw, e = cached[1][0]
            self.heads[layer] = (scale * raw, layer, e)
        else:
            self.heads.pop(layer, None)

    def resident_changed(self, layer: int, e: int, raw: float, added: bool, version: int, scale: float) -> None:
        """CacheState's notice that (layer, e) joined or left the residents (now at `version`)."""
        cached = self.orders.get(layer)
        if cached is None or cached[0] != version - 1:
            self.invalidate(layer)  # not in step: rebuilt at the next victim
            return
        lst = cached[1]
        if added:
            bisect.insort(lst, (raw, e))
        else:
            i = bisect.bisect_left(lst, (raw, e))
            assert i < len(lst) and lst[i] == (raw, e), ((layer, e), raw)
            del lst[i]
        self.orders[layer] = (version, lst)
        self.refresh_head(layer, scale)

    # -- queries -------------------------------------------------------------------------------
    def _build(self, layer: int, resident: set[int], stamp: int, raw: dict[int, float], scale: float) -> None:
        self.orders[layer] = (stamp, sorted((raw.get(e, 0.0), e) for e in resident))
        self.dirty.discard(layer)
        self.refresh_head(layer, scale)

    def victim(self, view, raw_of: Callable[[int], dict[int, float]],
               scale_of: Callable[[int], float]) -> ExpertKey | None:
        """The lowest (S, layer, expert) of a CandidateView (resident experts of `view.layers` minus
        `view.excluded`)."""
        if view.versions is not self._versions:  # another cache's residents: start over
            self.orders.clear()
            self.heads.clear()
            self.dirty = set(view.by_layer)
            self._versions = view.versions
        for layer in [d for d in self.dirty if view.by_layer.get(d)]:
            self._build(layer, view.by_layer[layer], view.versions.get(layer, 0), raw_of(layer), scale_of(layer))
        heads = self.heads
        if len(view.layers) != len(view.by_layer):  # a per-layer budget: only these layers compete
            pool = [heads[layer] for layer in view.layers if layer in heads]
        else:
            pool = None  # every layer with residents competes: all heads
        excluded = view.excluded
        blocked = {layer for layer, e in excluded
                   if layer in heads and heads[layer][2] == e and (pool is None or layer in view.layers)}
        if pool is None:  # set the blocked heads aside for one C-level min over the rest
            saved = [(layer, heads.pop(layer)) for layer in blocked]
            best = min(heads.values(), default=None)
            heads.update(saved)
        else:
            best = min((h for h in pool if h[1] not in blocked), default=None)
        if blocked:
            for layer in blocked:  # its lowest resident is excluded: its first candidate instead
                scale = scale_of(layer)
                for raw, e in self.orders[layer][1]:
                    if (layer, e) not in excluded:
                        cand = (scale * raw, layer, e)
                        if best is None or cand < best:
                            best = cand
                        break
        return None if best is None else (best[1], best[2])
