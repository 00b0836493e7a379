"""Predictions of future layers' experts, for the prefetcher.

The runtime predicts from hidden states (the gates of layers l+1..l+L applied to layer l's hidden
state). Routing traces have no hidden states, so the simulator uses predictors of a STATED quality:
- `TruthWithNoise(accuracy)`: the true future routing, each true (token, expert) kept with
  probability `accuracy`, else replaced by a uniformly random expert the token did not use (seeded;
  two replacements of one token may coincide, then that expert counts that token twice);
- `CrossLayerStats`: learned from dev traces, P(expert f at layer l+d | expert e at layer l); a
  token's prediction is the top-k experts by sum_e P(f | e) over its experts at layer l;
- `NoPredictor`: predicts nothing.
Output, shared with the runtime: {future layer: {expert: predicted token count}}.
"""

from __future__ import annotations

import random
from typing import Iterable, Protocol

from hybrimoe.trace.format import RoutingTrace, TokenRouting


class Predictor(Protocol):
    name: str

    def predict(self, tokens: list[TokenRouting], layer: int, future: list[int]) -> dict[int, dict[int, int]]:
        """Predicted per-expert token counts of the `future` layers for this forward's `tokens`,
        using what is known at `layer` (implementations that see the truth say so)."""
        ...


class NoPredictor:
    name = "none"

    def predict(self, tokens: list[TokenRouting], layer: int, future: list[int]) -> dict[int, dict[int, int]]:
        return {}


class TruthWithNoise:
    """True future routing corrupted to a given per-expert accuracy (1.0 = oracle)."""

    def __init__(self, accuracy: float, num_experts: int, seed: int = 0) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"predictor accuracy must be in [0, 1], got {accuracy}")
        self.accuracy = accuracy
        self.num_experts = num_experts
        self.rng = random.Random(seed)
        self.name = f"truth-with-noise({accuracy:g})"

    def predict(self, tokens: list[TokenRouting], layer: int, future: list[int]) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = {}
        rand, randrange, p, n = self.rng.random, self.rng.randrange, self.accuracy, self.num_experts
        for f in future:
            counts: dict[int, int] = {}
            for token in tokens:
                routing = token.layers.get(f)
                if routing is None:
                    continue
                true = routing.experts
                for e in true:
                    if p < 1.0 and rand() >= p and len(true) < n:
                        e = randrange(n)
                        while e in true:
                            e = randrange(n)
                    counts[e] = counts.get(e, 0) + 1
            out[f] = counts
        return out


class CrossLayerStats:
    """P(expert at layer l+d | expert at layer l), counted on dev traces of the same model."""

    name = "cross-layer-stats"

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self._pair: dict[tuple[int, int, int], dict[int, float]] = {}  # (l, f, e) -> {expert at f: count}
        self._occ: dict[tuple[int, int], float] = {}  # (l, e) -> count

    def fit(self, traces: Iterable[RoutingTrace], horizon: int = 3) -> "CrossLayerStats":
        for trace in traces:
            moe = sorted(trace.header.moe_layers)
            for token in trace.tokens:
                for i, l in enumerate(moe):
                    here = token.layers.get(l)
                    if here is None:
                        continue
                    for e in here.experts:
                        self._occ[(l, e)] = self._occ.get((l, e), 0.0) + 1.0
                    for f in moe[i + 1: i + 1 + horizon]:
                        there = token.layers.get(f)
                        if there is None:
                            continue
                        for e in here.experts:
                            row = self._pair.setdefault((l, f, e), {})
                            for g in there.experts:
                                row[g] = row.get(g, 0.0) + 1.0
        return self

    def predict(self, tokens: list[TokenRouting], layer: int, future: list[int]) -> dict[int, dict[int, int]]:
        out: dict[int, dict[int, int]] = {}
        for f in future:
            counts: dict[int, int] = {}
            for token in tokens:
                here = token.layers.get(layer)
                if here is None:
                    continue
                score: dict[int, float] = {}
                for e in here.experts:
                    occ = self._occ.get((layer, e), 0.0)
                    for g, c in self._pair.get((layer, f, e), {}).items():
                        score[g] = score.get(g, 0.0) + c / occ
                for g in sorted(score, key=lambda g: (-score[g], g))[: self.top_k]:
                    counts[g] = counts.get(g, 0) + 1
            out[f] = counts
        return out


def prediction_accuracy(predictor: Predictor, traces: Iterable[RoutingTrace], horizon: int = 1) -> float:
    """Fraction of true (token, layer, expert) activations that one-token predictions recover."""
    hit = total = 0
    for trace in traces:
        moe = sorted(trace.header.moe_layers)
        for token in trace.tokens:
            for i, l in enumerate(moe[:-horizon] if horizon else moe):
                f = moe[i + horizon]
                if l not in token.layers or f not in token.layers:
                    continue
                pred = predictor.predict([token], l, [f]).get(f, {})
                true = token.layers[f].experts
                hit += sum(1 for e in true if e in pred)
                total += len(true)
    return hit / total if total else 0.0
