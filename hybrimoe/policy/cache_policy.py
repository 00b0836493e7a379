"""Expert-cache replacement policies: which cached expert to evict when a new one must come in.

A policy only ranks; slot accounting is `CacheState` (cache_state.py), reused by the GPU runtime.
Protocol:
- `observe(layer, scores, selected, weights=None)`: called once per TOKEN per MoE layer with the
  router's full score vector (or None when unknown) and the experts the token used;
- `touch(key)`: the expert was used from the cache (hit) or just inserted;
- `victim(candidates) -> key | None`: the candidate to evict; None = do not admit the newcomer
  (a static cache never changes);
- `score(key) -> float`: the policy's value of an expert (higher = keep); used to refuse admitting
  an expert worth less than the one it would evict, and by the next-layer-score prefetcher.
Registry: `make_policy(name, top_k=..., ...)`; unknown name -> ConfigError listing known names.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Iterable, Protocol

from hybrimoe.errors import ConfigError
from hybrimoe.policy.mrs_order import SortedResidents
from hybrimoe.policy.plan import ExpertKey

_RESCALE_BELOW = 1e-150  # MRS lazy-decay scale renormalised below this (float underflow guard)


class CachePolicy(Protocol):
    name: str

    def observe(self, layer: int, scores: list[float] | None, selected: list[int],
                weights: list[float] | None = None) -> None: ...

    def touch(self, key: ExpertKey) -> None: ...

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None: ...

    def score(self, key: ExpertKey) -> float: ...


class MRSPolicy:
    """Minus Recent Score (PAPER.md (iii)). Per expert a priority S, updated per token:

        S <- alpha * TopP(s) + (1 - alpha) * S,   p = 2 * top_k,

    where s is the token's router score vector for that layer and TopP keeps its p largest entries
    (others zero). Victim = the candidate with the lowest S.
    When a trace carries no full score vector, the known part of s is used: the selected experts'
    combine weights (every other expert's score counts as 0), i.e. TopP keeps those k <= p values.
    Implementation: the decay is lazy, S = scale[layer] * raw[layer][e], so an update costs O(p)
    instead of O(E); both views give exactly the formula above (tests check this).
    """

    name = "mrs"

    def __init__(self, top_k: int, alpha: float = 0.5, p: int | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(f"MRS alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.p = p if p is not None else 2 * top_k
        self._raw: dict[int, dict[int, float]] = {}
        self._scale: dict[int, float] = {}
        self._sorted = SortedResidents()  # residents in eviction order, per layer (mrs_order.py)

    def observe(self, layer: int, scores: list[float] | None, selected: list[int],
                weights: list[float] | None = None) -> None:
        if scores is not None:
            top = heapq.nlargest(self.p, range(len(scores)), key=scores.__getitem__)
            known = {e: float(scores[e]) for e in top}
        else:
            w = weights if weights is not None else [1.0 / max(1, len(selected))] * len(selected)
            known = dict(sorted(zip(selected, w), key=lambda x: -x[1])[: self.p])
        scale = self._scale.get(layer, 1.0) * (1.0 - self.alpha)
        raw = self._raw.setdefault(layer, {})
        if scale < _RESCALE_BELOW or scale == 0.0:  # alpha == 1 or long run: fold the scale in
            for e in raw:
                raw[e] *= scale
            scale = 1.0
            self._sorted.invalidate(layer)  # stored raw values changed: re-sort at the next victim
        for e, s in known.items():
            old = raw.get(e, 0.0)
            raw[e] = old + self.alpha * s / scale
            self._sorted.raw_changed(layer, e, old, raw[e])
        self._scale[layer] = scale
        self._sorted.refresh_head(layer, scale)

    def priority(self, layer: int, expert: int) -> float:
        """S of one expert (0 if never scored)."""
        return self._scale.get(layer, 1.0) * self._raw.get(layer, {}).get(expert, 0.0)

    def score(self, key: ExpertKey) -> float:
        return self.priority(*key)

    def touch(self, key: ExpertKey) -> None:
        pass  # MRS ranks by router scores only

    def resident_changed(self, key: ExpertKey, added: bool, version: int) -> None:
        """CacheState's notice that `key` joined or left the residents (now at `version` for its
        layer): the layer's sorted order is patched in O(log n + n) instead of re-sorted."""
        layer, e = key
        self._sorted.resident_changed(layer, e, self._raw.get(layer, {}).get(e, 0.0), added, version,
                                      self._scale.get(layer, 1.0))

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        if hasattr(candidates, "by_layer"):  # CandidateView: one min over the layers' lowest residents
            return self._sorted.victim(candidates, lambda layer: self._raw.get(layer, {}),
                                       lambda layer: self._scale.get(layer, 1.0))
        return min(candidates, key=lambda k: (self.score(k), k), default=None)


class LRUPolicy:
    """Least recently used: victim = the candidate used longest ago.

    A use is an activation (`observe`, hit or miss) or an insertion (`touch`). Counting a miss as a
    use matters for `insert(..., by_value=True)` (miss filling): the expert that just missed is then
    the most recently used one and displaces the least recently used resident, as in LRU; with hits
    only, an expert never resident would score 0 and never be admitted (the cache froze)."""

    name = "lru"

    def __init__(self, **_: object) -> None:
        self._clock = 0
        self._last: dict[ExpertKey, int] = {}
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # oldest touch first

    def observe(self, layer, scores, selected, weights=None) -> None:
        for e in selected:
            self.touch((layer, e))

    def touch(self, key: ExpertKey) -> None:
        self._clock += 1
        self._last[key] = self._clock
        self._order[key] = None
        self._order.move_to_end(key)

    def score(self, key: ExpertKey) -> float:
        return float(self._last.get(key, 0))

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        if hasattr(candidates, "by_layer"):  # CandidateView: walk the touch order, oldest first
            view = candidates
            layers = set(view.layers)
            stale, found = [], None
            for key in self._order:
                if key[1] not in view.by_layer.get(key[0], ()):
                    stale.append(key)  # evicted since its last touch; _last keeps its time
                elif key[0] in layers and key not in view.excluded:
                    found = key
                    break
            for key in stale:
                del self._order[key]
            if found is not None:
                return found
            candidates = list(view)  # only never-touched residents are left
        return min(candidates, key=lambda k: (self._last.get(k, 0), k), default=None)


class LFUPolicy:
    """Least frequently used: activation counts since start (from `observe`), ties by recency."""

    name = "lfu"

    def __init__(self, **_: object) -> None:
        self._count: dict[ExpertKey, int] = {}
        self._lru = LRUPolicy()

    def observe(self, layer, scores, selected, weights=None) -> None:
        for e in selected:
            self._count[(layer, e)] = self._count.get((layer, e), 0) + 1

    def touch(self, key: ExpertKey) -> None:
        self._lru.touch(key)

    def score(self, key: ExpertKey) -> float:
        return float(self._count.get(key, 0))

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._lru.score(k), k), default=None)


class StaticPolicy:
    """A fixed hot set (e.g. the most frequently activated experts of a warm-up/dev trace).

    Experts of the static set are never evicted; any other resident expert is evicted first
    (least frequent first). With the cache full of the static set, `victim` returns None: the
    newcomer is used from a transient buffer and the cache does not change (kTransformers, Fiddler).
    """

    name = "static"

    def __init__(self, hot: Iterable[ExpertKey] = (), frequency: dict[ExpertKey, float] | None = None,
                 **_: object) -> None:
        self.hot = set(hot)
        self.frequency = dict(frequency or {})
        self._hot_by_layer: dict[int, set[int]] = {}
        for layer, e in self.hot:
            self._hot_by_layer.setdefault(layer, set()).add(e)

    def observe(self, layer, scores, selected, weights=None) -> None:
        pass

    def touch(self, key: ExpertKey) -> None:
        pass

    def score(self, key: ExpertKey) -> float:
        return float("inf") if key in self.hot else self.frequency.get(key, 0.0)

    def victim(self, candidates: Iterable[ExpertKey]) -> ExpertKey | None:
        if hasattr(candidates, "by_layer"):  # CandidateView: set differences per layer
            view = candidates
            movable = [(layer, e) for layer in view.layers
                       for e in view.by_layer.get(layer, set()) - self._hot_by_layer.get(layer, set())
                       if (layer, e) not in view.excluded]
        else:
            movable = [k for k in candidates if k not in self.hot]
        return min(movable, key=lambda k: (self.frequency.get(k, 0.0), k), default=None)


POLICIES = {"mrs": MRSPolicy, "lru": LRUPolicy, "lfu": LFUPolicy, "static": StaticPolicy}


def make_policy(name: str, top_k: int = 2, **options: object) -> CachePolicy:
    """A cache policy by name. `top_k` sets MRS's p = 2 * top_k; `alpha` (MRS), `hot` and
    `frequency` (static) pass through `options`."""
    if name not in POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; known: {', '.join(POLICIES)}")
    if name == "mrs":
        return MRSPolicy(top_k=top_k, alpha=float(options.get("alpha", 0.5)))  # type: ignore[arg-type]
    return POLICIES[name](**options)  # type: ignore[operator]


def activation_frequency(token_layers: Iterable[tuple[int, list[int]]]) -> dict[ExpertKey, float]:
    """{(layer, expert): activations} from (layer, selected experts) pairs, e.g. a dev trace."""
    freq: dict[ExpertKey, float] = {}
    for layer, experts in token_layers:
        for e in experts:
            freq[(layer, e)] = freq.get((layer, e), 0.0) + 1.0
    return freq


def hot_set(frequency: dict[ExpertKey, float], capacity: int, per_layer: dict[int, int] | None = None
            ) -> list[ExpertKey]:
    """The `capacity` most frequent experts (ties by key); with `per_layer` budgets, per layer."""
    ranked = sorted(frequency, key=lambda k: (-frequency[k], k))
    if per_layer is None:
        return ranked[:capacity]
    taken: dict[int, int] = {}
    out = []
    for k in ranked:
        if taken.get(k[0], 0) < per_layer.get(k[0], 0):
            taken[k[0]] = taken.get(k[0], 0) + 1
            out.append(k)
    return out
