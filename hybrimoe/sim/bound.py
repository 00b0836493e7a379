"""A computed lower bound on the duration of one forward, for the cache content a policy held.

Any schedule of the simulator's form (batch 1; per layer the dense GPU part, then the MoE part;
an activated expert runs wholly on the CPU, or on the GPU after a host->GPU copy when it is not
already on the GPU side) with the same experts resident at each MoE layer's access (`LayerLog`:
cached, staged or in flight) takes at least `forward_bound(...).seconds`. The bound is the value
of the FLUID RELAXATION, a linear program with these relaxations of a real schedule:
1. fractions: an expert's work may be split between the CPU and the GPU (x on the CPU costs
   x * cpu, 1 - x on the GPU costs (1 - x) * gpu, and for a miss (1 - x) * copy seconds of link);
   a real schedule is the special case x in {0, 1};
2. CPU costs are the NON-first cost min(cpu(n, first=False), cpu(n, first=True)) for every expert
   (a real layer pays the first-expert surcharge once);
3. no order and no arrival times: a layer's MoE part takes max(CPU work, GPU work) of the layer,
   as if every copy had arrived at its start (a real plan also waits for copies and idles);
4. the link: the copy seconds of all copied fractions of the forward are at most the forward's
   duration T (copies may happen any time, even before their layer; a real link also serialises
   them behind the accesses);
5. residents are free on the GPU (also an in-flight prefetch that arrives late), and may be moved
   to the CPU; prefetches and miss fills for later forwards are not charged.
Layers run one after another after their dense part: T >= D + sum_l max(CPU_l, GPU_l), where D is
the forward's dense GPU seconds (every layer's dense part and the LM head, `ForwardLog`).

LP:  minimise T  s.t.  T >= D + sum_l z_l,  z_l >= C_l(y),  z_l >= G_l(y),  T >= sum_l c_l K_l(y),
with y_e in [0, 1] the GPU fraction of expert e, C_l = sum_e a_e (1 - y_e) (CPU seconds),
G_l = sum_e g_e y_e (GPU seconds), K_l = sum over misses of y_e (copied experts), c_l = copy seconds.

Solution (weak duality, then exactness). For lam in [0, 1], T >= (1 - lam) (D + sum z_l) + lam *
(link seconds) holds for every feasible point, so
    phi(lam) = (1 - lam) D + sum_l min_y [(1 - lam) max(C_l, G_l) + lam c_l K_l]
is a lower bound for EVERY lam; phi is concave and max phi = the LP value (LP duality). The layer
term, with p = lam c_l / (1 - lam) the link price per copied expert, is (1 - lam) H_l(p),
    H_l(p) = min_y max(C, G) + p K = max_{beta in [0, 1]} Q(beta),
    Q(beta) = beta A + sum_e min(0, g_e + p miss_e - beta (a_e + g_e)),   A = sum_e a_e
(max(C, G) = max_beta beta C + (1 - beta) G; min-max = max-min for this bilinear form; for fixed
beta the minimum over y is separable). Q is concave piecewise linear with breakpoints
beta_e = (g_e + p miss_e) / (a_e + g_e), so its maximum is at the breakpoint where the cumulative
a_e + g_e (in breakpoint order) first reaches A, or at beta = 1: O(E log E) per layer, exact. Q at
ANY beta is a lower bound, so the bound stays valid whatever the search finds. The minimiser y is
recovered at that breakpoint (experts before it on the GPU, the breakpoint's expert split so that
C = G), which gives a supporting line of phi; the outer maximisation over lam is Kelley's cutting
plane in one dimension (intersect the supporting lines at both ends of the bracket), which ends on
a breakpoint of the piecewise linear phi in finitely many steps. `upper` is the primal value of a
feasible fractional point, so the LP value lies in [seconds, upper] (equal to ~1e-12 in practice).
All of it holds up to floating-point rounding (~1e-15 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrimoe.sim.costs import SimCosts
from hybrimoe.sim.metrics import ForwardLog

Item = tuple[float, float, bool]  # (cpu seconds a, gpu seconds g, miss) of one activated expert
_TOL = 1e-12  # relative gap at which the outer search stops
_MAX_ITER = 200


@dataclass(frozen=True)
class FluidBound:
    seconds: float  # lower bound on the forward's duration (the best dual value found)
    upper: float  # a feasible fractional schedule's time: the LP value is in [seconds, upper]
    no_link_seconds: float  # the bound without the link constraint (lam = 0): D + sum_l min max(C, G)
    dense_seconds: float  # D
    link_weight: float  # lam at which `seconds` was found


@dataclass(frozen=True)
class LayerPoint:
    dual: float  # H(p) = max_beta Q(beta), a lower bound of min_y max(C, G) + p K
    span: float  # max(C, G) of the recovered minimiser y
    copied: float  # K of y (copied experts, fractional)


def layer_point(items: list[Item] | tuple[Item, ...], p: float) -> LayerPoint:
    """H(p) for one layer (p = link price per copied expert, seconds; math.inf = no copies) and the
    minimiser y's (max(C, G), K)."""
    total_cpu = sum(a for a, _, _ in items)
    order = []  # (beta_e, miss, a, g)
    for a, g, miss in items:
        w = a + g
        if w <= 0.0:
            continue  # a zero-cost expert changes nothing
        if miss and math.isinf(p):
            beta = math.inf
        else:
            beta = (g + (p if miss else 0.0)) / w
        order.append((beta, miss, a, g))
    order.sort(key=lambda t: (t[0], t[1]))  # residents before misses at equal breakpoints: least link
    beta_star, cum, split = 1.0, 0.0, None
    for i, (beta, _, a, g) in enumerate(order):
        if beta > 1.0:
            break
        if cum + a + g >= total_cpu:
            beta_star, split = beta, i
            break
        cum += a + g
    dual = beta_star * total_cpu
    for beta, miss, a, g in order:
        if beta < beta_star:  # min(0, g + p miss - beta* (a + g)) is negative
            dual += g + (p if miss else 0.0) - beta_star * (a + g)
    cpu, gpu, copied = total_cpu, 0.0, 0.0
    for i, (beta, miss, a, g) in enumerate(order):
        if split is not None and i == split:
            y = (total_cpu - cum) / (a + g)  # C = G at the split expert
        elif (split is not None and i < split) or (split is None and beta < 1.0):
            y = 1.0
        else:
            continue
        cpu -= a * y
        gpu += g * y
        copied += y if miss else 0.0
    return LayerPoint(dual, max(cpu, gpu), copied)


def forward_items(forward: ForwardLog, costs: SimCosts) -> list[tuple[float, tuple[Item, ...]]]:
    """Per MoE layer of `forward`: (copy seconds, items sorted), priced by `costs`."""
    out = []
    for layer in forward.layers:
        ec = costs.experts(layer.layer)
        items = tuple(sorted((min(ec.cpu(n, False), ec.cpu(n, True)), ec.gpu(n), e not in layer.resident)
                             for e, n in layer.counts.items()))
        out.append((ec.copy(), items))
    return out


def fluid_bound(dense: float, layers: list[tuple[float, tuple[Item, ...]]]) -> FluidBound:
    """The LP value for dense seconds `dense` and MoE layers [(copy seconds, items)] (see module doc)."""
    groups: dict[tuple[float, tuple[Item, ...]], int] = {}
    for key in layers:
        groups[key] = groups.get(key, 0) + 1

    def evaluate(lam: float) -> tuple[float, float, float]:
        """(phi(lam), A(y), L(y)): the dual value and the supporting line (1 - l) A + l L of y."""
        value, span, link = (1.0 - lam) * dense, dense, 0.0
        for (copy, items), count in groups.items():
            if lam >= 1.0:
                pt = layer_point(items, math.inf)
                part = 0.0  # (1 - lam) H = 0
            else:
                pt = layer_point(items, lam * copy / (1.0 - lam))
                part = (1.0 - lam) * pt.dual
            value += count * part
            span += count * pt.span
            link += count * copy * pt.copied
        return value, span, link

    no_link, span_lo, link_lo = evaluate(0.0)
    best, best_lam = no_link, 0.0
    if link_lo <= span_lo:  # slope of phi at 0 is <= 0: the link does not bind
        return FluidBound(no_link, span_lo, no_link, dense, 0.0)
    _, span_hi, link_hi = evaluate(1.0)
    lo, hi = 0.0, 1.0
    upper = max(span_lo, link_lo)
    for _ in range(_MAX_ITER):
        slope_lo, slope_hi = link_lo - span_lo, link_hi - span_hi  # > 0, < 0
        lam = lo if slope_lo <= slope_hi else (span_hi - span_lo) / (slope_lo - slope_hi)
        if not lo < lam < hi:
            break  # the bracket cannot shrink further (rounding)
        # the two lines meet at lam: the convex combination of their points is feasible with this time
        upper = min(upper, (1.0 - lam) * span_lo + lam * link_lo)
        value, span, link = evaluate(lam)
        if value > best:
            best, best_lam = value, lam
        if upper - best <= _TOL * upper or hi - lo <= 1e-15:
            break
        if link - span > 0.0:
            lo, span_lo, link_lo = lam, span, link
        elif link - span < 0.0:
            hi, span_hi, link_hi = lam, span, link
        else:
            upper = min(upper, value)  # phi is flat at lam: its maximum
            break
    return FluidBound(best, max(upper, best), no_link, dense, best_lam)


def forward_bound(forward: ForwardLog, costs: SimCosts) -> FluidBound:
    """The fluid lower bound of one logged forward."""
    return fluid_bound(forward.dense_seconds, forward_items(forward, costs))


def phase_bounds(forwards: list[ForwardLog], costs: SimCosts) -> tuple[float | None, float | None]:
    """(bound of the prefill forward's TTFT, bound of the mean decode forward's TBT); None where the run
    had no such forward. A mean of lower bounds bounds the mean."""
    prefill = [forward_bound(f, costs).seconds for f in forwards if f.phase == "prefill"]
    decode = [forward_bound(f, costs).seconds for f in forwards if f.phase == "decode"]
    return (prefill[0] if prefill else None), (sum(decode) / len(decode) if decode else None)
