"""A computed lower bound on the duration of one forward, for the cache content a policy held.

Any schedule of the simulator's form (a prompt, or a decode step of B sequences; per layer the
dense GPU part, then the MoE part over the forward's per-expert token counts;
an activated expert runs wholly on the CPU, or on the GPU after a host->GPU copy when it is not
already on the GPU side) with the same experts landed on the GPU side at each MoE layer's access
(`LayerLog`: cached or staged and arrived; one still in flight counts as a miss, whose copy, if
the schedule waits for it, happens within the forward, unless that copy began before the forward:
then it counts as resident, `sim.simulator.bound_residents`) takes at least `forward_bound(...).seconds`. The bound is the value
of the FLUID RELAXATION, a linear program with these relaxations of a real schedule, strengthened
for small layers (see "Integral layers" below):
1. fractions: an expert's work may be split between the CPU and the GPU (x on the CPU costs
   x * cpu, 1 - x on the GPU costs (1 - x) * gpu, and for a miss (1 - x) * copy seconds of link);
   a real schedule is the special case x in {0, 1}. Not for layers of at most EXACT_ITEMS (6)
   activated experts in `forward_bound` (every decode layer of Mixtral, Qwen1.5-MoE, DeepSeek-V2-Lite);
2. CPU costs: every CPU expert costs its NON-first cost a_e = min(cpu(n, first=False), cpu(n,
   first=True)), and a layer pays s_l * m_l on top, with s_l = min over the layer's activated
   experts of max(0, cpu(n, True) - cpu(n, False)) (its SMALLEST first-expert surcharge) and m_l =
   max_e x_e (the largest CPU fraction). A real layer whose CPU runs anything pays the surcharge of
   the expert it runs first (>= s_l), one that runs nothing pays none: at x in {0, 1}, m_l is
   exactly "the CPU runs something", and s_l * max_e x_e is the convex envelope of s_l times that
   indicator over [0, 1]^E, so no convex term of the x alone charges more;
3. no order and no arrival times: a layer's MoE part takes max(CPU work, GPU work) of the layer,
   as if every copy had arrived at its start (a real plan also waits for copies and idles);
4. the link: the copy seconds of all copied fractions of the forward, plus `held_link` (see 5),
   are at most the forward's duration T (copies may happen any time, even before their layer; a real link also serialises
   them behind the accesses);
5. residents are free on the GPU and may be moved to the CPU; prefetches and miss fills for
   later forwards are not charged. One exception: an expert that had landed on the GPU side by its
   access but was not there when the forward began (`ForwardLog.entered`: a prefetch or fill of
   this forward) was copied within this forward, so its copy seconds count on the link
   (`held_link`).
Layers run one after another after their dense part: T >= D + sum_l max(CPU_l, GPU_l), where D is
the forward's dense GPU seconds (every layer's dense part and the LM head, `ForwardLog`).

LP:  minimise T  s.t.  T >= D + sum_l z_l,  z_l >= C_l(y),  z_l >= G_l(y),  T >= L0 + sum_l c_l K_l(y),
with y_e in [0, 1] the GPU fraction of expert e, m_l in [0, 1] with m_l >= 1 - y_e for every e of
layer l, C_l = sum_e a_e (1 - y_e) + s_l m_l (CPU seconds), G_l = sum_e g_e y_e (GPU seconds),
K_l = sum over misses of y_e (copied experts), c_l = copy seconds, L0 = held_link.

Solution (weak duality, then exactness). For lam in [0, 1], T >= (1 - lam) (D + sum z_l) + lam *
(link seconds) holds for every feasible point, so
    phi(lam) = (1 - lam) D + lam L0 + sum_l min_{y, m} [(1 - lam) max(C_l, G_l) + lam c_l K_l]
is a lower bound for EVERY lam; phi is concave and max phi = the LP value (LP duality). The layer
term, with p = lam c_l / (1 - lam) the link price per copied expert, is (1 - lam) H_l(p),
    H_l(p) = min_{y, m} max(C, G) + p K = max_{beta in [0, 1]} Q(beta),
(max(C, G) = max_beta beta C + (1 - beta) G; min-max = max-min for this bilinear form). With
b_e = g_e + p miss_e, w_e = a_e + g_e, A = sum_e a_e and s = s_l: for fixed beta the CPU share
1 - y_e of expert e is m where b_e > beta w_e and 0 otherwise, which leaves a term linear in m, so
m in {0, 1} and
    Q(beta) = min(R(beta), Q_s(beta)),   R(beta) = sum_e (b_e - beta g_e)   (all on the GPU, m = 0),
    Q_s(beta) = beta (A + s) + sum_e min(0, b_e - beta w_e)             (the CPU pays s, m = 1).
Q_s is concave piecewise linear with breakpoints beta_e = b_e / w_e, so its maximum beta_s is at
the breakpoint where the cumulative w_e (in breakpoint order) first reaches A + s, or at beta = 1.
R - Q_s = D(beta) = sum_e max(0, b_e - beta w_e) - beta s is continuous and decreasing and R
decreases, so Q = Q_s up to the root beta_c of D and R after it: Q is maximal at
min(beta_s, beta_c), found by one scan of the breakpoints: O(E log E) per layer, exact (s = 0
gives back the bound without the surcharge, Q = Q_s). Q at ANY beta is a lower bound, so the bound
stays valid whatever the search finds. The minimiser is recovered there: at beta_s, m = 1 and the
experts before the breakpoint on the GPU, the breakpoint's expert split so that C = G; at beta_c,
the experts before the root on the GPU and each one after it at the CPU share m that makes
C = G (m <= 1 as Q_s still rises at beta_c). Either gives a supporting line of phi; the outer
maximisation over lam is Kelley's cutting plane in one dimension (intersect the supporting lines
at both ends of the bracket), which ends on a breakpoint of the piecewise linear phi in finitely
many steps. `upper` is the primal value of a feasible fractional point (the convex combination
of the two ends' points where their lines meet, also when rounding puts that on an end), so the LP
value lies in [seconds, upper] (equal to ~1e-14 in practice).
All of it holds up to floating-point rounding (~1e-15 relative).

Integral layers. Weak duality needs nothing fractional: for every integral schedule and lam in
[0, 1], T >= (1 - lam)(D + sum_l max(C_l, G_l)) + lam (L0 + sum_l c_l K_l) >= phi(lam) still holds
when a layer's term is minimised over its 2^E integral assignments (C = the CPU set's a_e plus s
once when it is not empty, G = the GPU set's g_e, K = its misses) instead of over fractions. For
E <= EXACT_ITEMS `forward_bound` does exactly that (`exact_layer_point`, enumerated and memoised);
phi stays concave (a minimum of lines in lam) and the same outer search applies, so the value is
the Lagrangian dual of the integral program with relaxations 2-5 only: at least the LP value (a
layer's fractional minimum is at most its integral one), at most the best integral schedule (tests
check both, and the value against a brute-force dual). `upper` then bounds that dual's maximum
(its points time-share integral assignments; no single schedule need reach it). Measured effect
(eval traces, paper-a6000, hybrimoe at predictor accuracy 1.0): the bound rises 3-13% on Mixtral
and Qwen1.5 decode, where a miss's fractional split between a slow CPU and a fast GPU was the
largest slack; Qwen3.6 (8 experts per layer) keeps the LP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybrimoe.sim.costs import SimCosts
from hybrimoe.sim.metrics import ForwardLog

Item = tuple[float, float, bool]  # (cpu seconds a, gpu seconds g, miss) of one activated expert
Layer = tuple[float, float, tuple[Item, ...]]  # (copy seconds, first-expert surcharge s, items)
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


def layer_point(items: list[Item] | tuple[Item, ...], p: float, surcharge: float = 0.0) -> LayerPoint:
    """H(p) for one layer (p = link price per copied expert, seconds; math.inf = no copies; surcharge
    = s, seconds, paid in proportion to the largest CPU share) and the minimiser's (max(C, G), K)."""
    order = []  # (beta_e, miss, a, g, b_e)
    total_a = total_g = total_b = total_w = total_n = 0.0
    free_copies = 0  # misses of zero cost anywhere at p = 0: on the GPU (y = 1), counted in K
    for a, g, miss in items:
        b = g + (p if miss else 0.0)  # math.inf for a miss at p = inf
        w = a + g
        if w <= 0.0 and b <= 0.0:
            free_copies += miss  # costs nothing anywhere: on the GPU, so that it needs no CPU share
            continue
        order.append((math.inf if (w <= 0.0 or math.isinf(b)) else b / w, miss, a, g, b))
        total_a, total_g, total_b, total_w, total_n = total_a + a, total_g + g, total_b + b, total_w + w, total_n + miss
    order.sort(key=lambda t: (t[0], t[1]))  # residents before misses at equal breakpoints: least link
    target = total_a + surcharge  # Q_s's maximum: where the cumulative w reaches A + s
    # one scan in breakpoint order, with the sums over order[:i] (experts on the GPU up to here):
    # the split of Q_s's maximum (beta_s), or before it the root beta_c of D on [prev, beta]
    pa = pg = pb = pw = pn = prev = 0.0
    beta_s, beta_c, split = 1.0, None, None
    for i, (beta, miss, a, g, b) in enumerate(order):
        if beta > 1.0:
            break
        if surcharge > 0.0:
            root = (total_b - pb) / (total_w - pw + surcharge)  # D = rest_b - x (rest_w + s) here
            if root <= beta:
                beta_c = max(root, prev)
                break
        if pw + a + g >= target:
            beta_s, split = beta, i
            break
        pa, pg, pb, pw, pn, prev = pa + a, pg + g, pb + b, pw + a + g, pn + miss, beta
    if beta_c is None and split is None and surcharge > 0.0:  # no split: beta_s = 1; D's root in [prev, 1]?
        root = (total_b - pb) / (total_w - pw + surcharge)
        beta_c = max(root, prev) if root <= 1.0 else None
    beta = beta_s if beta_c is None else beta_c
    # Q(beta) = min(R, Q_s) (a lower bound at any beta); order[:i] have beta_e <= beta (ties add 0)
    dual = min(total_b - beta * total_g, beta * target + pb - beta * pw)
    if beta_c is None:  # the maximum is Q_s's: m = 1 (the CPU pays s), order[:i] on the GPU, split
        cpu, gpu, copied = target - pa, pg, free_copies + pn
        if split is not None:
            _, miss, a, g, _ = order[split]
            y = (target - pw) / (a + g)  # C = G at the split expert
            cpu, gpu, copied = cpu - a * y, gpu + g * y, copied + (y if miss else 0.0)
        return LayerPoint(dual, max(cpu, gpu), copied)
    # at beta_c: order[:i] on the GPU, every later one at the CPU share m with C = G:
    # m (s + their w) = G_total (m <= 1 as Q_s still rises at beta_c)
    width = surcharge + total_w - pw
    m = min(1.0, total_g / width) if width > 0.0 else 0.0
    cpu = m * (surcharge + total_a - pa)
    gpu = total_g - m * (total_g - pg)
    return LayerPoint(dual, max(cpu, gpu), free_copies + pn + (1.0 - m) * (total_n - pn))


EXACT_ITEMS = 6  # layers with at most this many activated experts get the exact (integral) layer term
_TABLE_LIMIT = 4096  # memoised assignment tables before the memo is cleared
_tables: dict[tuple[tuple[Item, ...], float], list[tuple[float, int]]] = {}


def _assignments(items: tuple[Item, ...], surcharge: float) -> list[tuple[float, int]]:
    """(max(C, G), K) of every integral assignment of the layer's experts (2^E, memoised): C = the CPU
    set's sum of a_e plus s when it is not empty, G = the GPU set's g_e, K = its misses."""
    key = (items, surcharge)
    found = _tables.get(key)
    if found is None:
        if len(_tables) >= _TABLE_LIMIT:
            _tables.clear()
        found = []
        for mask in range(1 << len(items)):  # bit i set: expert i on the CPU
            cpu = gpu = 0.0
            copied = 0
            for i, (a, g, miss) in enumerate(items):
                if mask >> i & 1:
                    cpu += a
                else:
                    gpu += g
                    copied += miss
            found.append((max(cpu + (surcharge if mask else 0.0), gpu), copied))
        _tables[key] = found
    return found


def exact_layer_point(items: tuple[Item, ...], p: float, surcharge: float = 0.0) -> LayerPoint:
    """min over the layer's integral assignments of max(C, G) + p K (p = math.inf: K = 0 only), and that
    assignment's (max(C, G), K); ties go to fewer copies. At least `layer_point`'s value (which relaxes
    the assignments to fractions)."""
    table = _assignments(tuple(items), surcharge)
    if math.isinf(p):
        span = min(span for span, copied in table if copied == 0)  # all on the CPU is one of them
        return LayerPoint(span, span, 0.0)
    value, copied, span = min((span + p * copied, copied, span) for span, copied in table)
    return LayerPoint(value, span, float(copied))


def forward_items(forward: ForwardLog, costs: SimCosts) -> list[Layer]:
    """Per MoE layer of `forward`: (copy seconds, surcharge s, items sorted), priced by `costs`."""
    out = []
    for layer in forward.layers:
        ec = costs.experts(layer.layer)
        items = tuple(sorted((min(ec.cpu(n, False), ec.cpu(n, True)), ec.gpu(n), e not in layer.resident)
                             for e, n in layer.counts.items()))
        surcharge = min((max(0.0, ec.cpu(n, True) - ec.cpu(n, False)) for n in layer.counts.values()), default=0.0)
        out.append((ec.copy(), surcharge, items))
    return out


def fluid_bound(dense: float, layers: list[Layer], held_link: float = 0.0, exact_items: int = 0) -> FluidBound:
    """The LP value for dense seconds `dense` and MoE layers [(copy seconds, surcharge, items)]
    (see module doc); `held_link`: link seconds the forward spent bringing in experts it then held
    (relaxation 5), on the link before any copied fraction. With `exact_items` > 0, layers of at most
    that many experts keep relaxation 1 out: their term is minimised over integral assignments
    (`exact_layer_point`), which makes the value the Lagrangian dual of the integral program (the
    LP over the convex hull of each such layer's assignments): at least the LP value, still a bound."""
    groups: dict[Layer, int] = {}
    for key in layers:
        groups[key] = groups.get(key, 0) + 1

    def evaluate(lam: float) -> tuple[float, float, float]:
        """(phi(lam), A(y), L(y)): the dual value and the supporting line (1 - l) A + l L of y."""
        value, span, link = (1.0 - lam) * dense + lam * held_link, dense, held_link
        for (copy, surcharge, items), count in groups.items():
            point = exact_layer_point if len(items) <= exact_items else layer_point
            if lam >= 1.0:
                pt = point(items, math.inf, surcharge)
                part = 0.0  # (1 - lam) H = 0
            else:
                pt = point(items, lam * copy / (1.0 - lam), surcharge)
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
        if slope_lo <= slope_hi:
            break  # not a bracket (rounding)
        lam = (span_hi - span_lo) / (slope_lo - slope_hi)
        # the two lines meet at lam: the convex combination of their points is feasible with this time
        # (also when rounding puts lam on an end of the bracket: the maximum is there)
        upper = min(upper, (1.0 - lam) * span_lo + lam * link_lo)
        if not lo < lam < hi:
            break  # the bracket cannot shrink further (rounding)
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


def forward_bound(forward: ForwardLog, costs: SimCosts, exact_items: int = EXACT_ITEMS) -> FluidBound:
    """The lower bound of one logged forward: layers of at most `exact_items` experts integral (0: the
    pure fluid LP)."""
    held_link = sum(costs.experts(layer).copy() for layer in forward.entered)
    return fluid_bound(forward.dense_seconds, forward_items(forward, costs), held_link, exact_items)


def phase_bounds(forwards: list[ForwardLog], costs: SimCosts) -> tuple[float | None, float | None]:
    """(bound of the prefill forward's TTFT, bound of the mean decode forward's TBT); None where the run
    had no such forward. A mean of lower bounds bounds the mean."""
    prefill = [forward_bound(f, costs).seconds for f in forwards if f.phase == "prefill"]
    decode = [forward_bound(f, costs).seconds for f in forwards if f.phase == "decode"]
    return (prefill[0] if prefill else None), (sum(decode) / len(decode) if decode else None)
