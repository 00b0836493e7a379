"""Synthetic routing for a model without a recorded trace, fitted per layer to the packaged real traces.

Two numbers describe one MoE layer of a real trace (T tokens, E experts, top-k):
  skew s     a Zipf exponent: expert of popularity rank r is drawn with weight r^-s. Fitted by the
             simulated method of moments: the s whose top-k draws (without replacement, T tokens)
             give the same share of activations to the most used quarter of the experts as the trace
             (finite-sample noise included, so a uniform router fits s ~ 0, not the noise's skew).
  reuse q    the excess temporal reuse: r = fraction of a token's experts that the previous token of
             its sequence also used in that layer, b = the reuse of independent Zipf(s) draws (Monte
             Carlo, tabulated with the share), q = (r - b) / (1 - b), so that the generator's expected
             reuse q + (1 - q) b is the trace's r.
Only the DEV traces are fitted (docs: ../shared/traces README, eval traces are for reporting).
A target model's MoE layer at relative depth d (0 = first MoE layer, 1 = last) takes, for each source
model, its per-layer values interpolated at d, averaged over the source models. Generation: per layer a
seeded random permutation maps popularity ranks to expert ids; each token keeps each of the previous
token's experts with probability q and fills the rest by Zipf draws without replacement (Gumbel top-k).
Combine weights are the chosen experts' Zipf weights, normalised; no router scores (MRS then ranks by
weights). Cross-layer correlation is not modelled. Rows from it are labelled synthetic everywhere.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from hybrimoe.policy.shape import ModelShape
from hybrimoe.trace.format import LayerRouting, RoutingTrace, TokenRouting, TraceHeader

log = logging.getLogger(__name__)

SOURCE = "synthetic"  # TraceHeader.source prefix of generated traces


@dataclass(frozen=True)
class LayerStats:
    depth: float  # relative depth among the model's MoE layers, 0..1
    share: float  # fraction of activations that went to the most used ceil(E/4) experts
    reuse: float  # r: fraction of a token's experts the previous token also used


@dataclass(frozen=True)
class LayerFit:
    depth: float
    skew: float  # Zipf exponent s
    excess_reuse: float  # q


def _quarter(experts: int) -> int:
    return max(1, -(-experts // 4))


def layer_stats(traces: list[RoutingTrace]) -> list[LayerStats]:
    """Per MoE layer of one model's traces (all of the same model): top-quarter share and reuse."""
    header = traces[0].header
    layers, e = sorted(header.moe_layers), header.num_experts
    out = []
    for i, layer in enumerate(layers):
        counts = np.zeros(e)
        tokens = same = pairs = 0
        for trace in traces:
            for seq in trace.sequences().values():
                prev: set[int] | None = None
                for tok in seq:
                    routing = tok.layers.get(layer)
                    if routing is None:
                        prev = None
                        continue
                    chosen = set(routing.experts)
                    counts[list(chosen)] += 1
                    tokens += 1
                    if prev is not None:
                        same += len(chosen & prev)
                        pairs += len(chosen)
                    prev = chosen
        if tokens == 0:
            continue
        share = float(np.sort(counts)[::-1][:_quarter(e)].sum() / counts.sum())
        out.append(LayerStats(i / max(1, len(layers) - 1), share, same / pairs if pairs else 0.0))
    return out


def _gumbel_topk(logp: np.ndarray, k: int, rng: np.random.Generator, rows: int) -> np.ndarray:
    """[rows, k] indices drawn without replacement with weights exp(logp) (Gumbel top-k)."""
    g = logp[None, :] - np.log(-np.log(rng.random((rows, logp.size))))
    return np.argpartition(-g, k - 1, axis=1)[:, :k]


SKEW_GRID = np.linspace(0.0, 4.0, 41)  # Zipf exponents tabulated per (experts, k, tokens)


@functools.lru_cache(maxsize=16)
def zipf_moments(experts: int, k: int, tokens: int, seed: int = 0, reps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(share, reuse) of independent top-k draws over SKEW_GRID (Monte Carlo, `tokens` tokens as the
    trace had, so the finite-sample noise of the trace's statistics is in the model too): the top-quarter
    share of activations, and the fraction of a token's experts the previous draw also had."""
    rng = np.random.default_rng(seed)
    ranks = np.log(np.arange(1, experts + 1))
    share, reuse = np.zeros(SKEW_GRID.size), np.zeros(SKEW_GRID.size)
    for i, s in enumerate(SKEW_GRID):
        for _ in range(reps):
            picks = _gumbel_topk(-s * ranks, k, rng, tokens)  # [T, k]
            counts = np.bincount(picks.ravel(), minlength=experts)
            share[i] += np.sort(counts)[::-1][:_quarter(experts)].sum() / counts.sum() / reps
            hot = np.zeros((tokens, experts), dtype=bool)
            np.put_along_axis(hot, picks, True, axis=1)
            reuse[i] += (hot[1:] & hot[:-1]).sum() / max(1, (tokens - 1) * k) / reps
    return np.maximum.accumulate(share), reuse


def fit_layer(stats: LayerStats, experts: int, k: int, tokens: int) -> LayerFit:
    """Skew: the grid's share curve inverted at the trace's share (interpolated); excess reuse q from
    reuse = q + (1 - q) * b, b the reuse of independent draws at that skew."""
    share, reuse = zipf_moments(experts, k, tokens)
    skew = float(np.interp(stats.share, share, SKEW_GRID)) if stats.share > share[0] else 0.0
    b = float(np.interp(skew, SKEW_GRID, reuse))
    q = (stats.reuse - b) / (1.0 - b) if b < 1.0 else 0.0
    return LayerFit(stats.depth, skew, min(1.0, max(0.0, q)))


def fit_model(traces: list[RoutingTrace]) -> list[LayerFit]:
    header = traces[0].header
    tokens = max(2, sum(len(t.tokens) for t in traces))  # the share counts every token of every trace
    return [fit_layer(st, header.num_experts, header.top_k, tokens) for st in layer_stats(traces)]


@functools.lru_cache(maxsize=1)
def fitted_sources() -> dict[str, list[LayerFit]]:
    """{packaged model: per-layer fits} over every packaged DEV trace."""
    from hybrimoe.data import packaged_traces

    by_model: dict[str, list[RoutingTrace]] = {}
    for t in packaged_traces(role="dev"):
        by_model.setdefault(t.model, []).append(RoutingTrace.load(t.path))
    fits = {model: fit_model(traces) for model, traces in by_model.items()}
    for model, f in fits.items():
        log.debug("synthetic routing: %s skew %.2f..%.2f, excess reuse %.2f..%.2f", model,
                  min(x.skew for x in f), max(x.skew for x in f), min(x.excess_reuse for x in f),
                  max(x.excess_reuse for x in f))
    return fits


def _interp(fits: list[LayerFit], depth: float) -> tuple[float, float]:
    d = [f.depth for f in fits]
    return (float(np.interp(depth, d, [f.skew for f in fits])),
            float(np.interp(depth, d, [f.excess_reuse for f in fits])))


def target_fits(num_moe_layers: int, sources: dict[str, list[LayerFit]] | None = None) -> list[LayerFit]:
    """Per MoE layer of the target: the source models' values at its relative depth, averaged."""
    sources = fitted_sources() if sources is None else sources
    out = []
    for i in range(num_moe_layers):
        depth = i / max(1, num_moe_layers - 1)
        values = [_interp(f, depth) for f in sources.values() if f]
        out.append(LayerFit(depth, float(np.mean([v[0] for v in values])), float(np.mean([v[1] for v in values]))))
    return out


def synthetic_trace(shape: ModelShape, prompt_tokens: int, decode_tokens: int, seed: int = 0,
                    fits: list[LayerFit] | None = None, sequence_seed: int | None = None) -> RoutingTrace:
    """One sequence of `prompt_tokens` prefill + `decode_tokens` decode tokens for `shape`.
    `seed` fixes the per-layer popularity (which experts are hot); `sequence_seed` (default `seed`)
    the draws, so two sequences of one model share their hot experts (a warm-up trace and the run)."""
    layers = sorted(shape.moe_layers)
    fits = target_fits(len(layers)) if fits is None else fits
    e, k = shape.num_experts, shape.top_k
    perm_rng = np.random.default_rng(seed)
    rng = np.random.default_rng(seed if sequence_seed is None else sequence_seed)
    ranks = np.log(np.arange(1, e + 1))
    per_layer = []
    for layer, fit in zip(layers, fits):
        perm = perm_rng.permutation(e)  # rank -> expert id
        logp = np.empty(e)
        logp[perm] = -fit.skew * ranks  # log weight of each expert id
        per_layer.append((layer, fit.excess_reuse, logp))
    total = prompt_tokens + decode_tokens
    tokens = [TokenRouting(0, pos, "prefill" if pos < prompt_tokens else "decode", {}) for pos in range(total)]
    for layer, q, logp in per_layer:
        weights_all = np.exp(logp - logp.max())
        prev: list[int] = []
        for tok in tokens:
            kept = [x for x in prev if rng.random() < q]
            masked = logp.copy()
            masked[kept] = -np.inf
            fresh = _gumbel_topk(masked, k - len(kept), rng, 1)[0].tolist() if len(kept) < k else []
            chosen = kept + [int(x) for x in fresh]
            w = weights_all[chosen]
            tok.layers[layer] = LayerRouting(chosen, (w / w.sum()).round(4).tolist())
            prev = chosen
    header = TraceHeader(shape.name, shape.num_layers, e, k, layers,
                         f"{SOURCE}: per-layer Zipf skew and temporal reuse fitted to the packaged dev traces, seed {seed}")
    return RoutingTrace(header, tokens)
