"""The lower bound (hybrimoe.sim.bound) against references: the exact LP value (an independent
rational simplex on the LP written out, first-expert surcharge included), a primal-dual pair per
layer, with integral small layers the exact value of the LP over each layer's assignments (the
Lagrangian dual), never above the best integral schedule that pays the true first-expert cost
(brute force and `optimal`), and never below the LP, the bound without the surcharge or without
the link."""

import itertools
import random
from dataclasses import dataclass
from fractions import Fraction

import pytest

from hybrimoe.policy.optimal import OptimalScheduler
from hybrimoe.policy.plan import LinearCosts, build_plan
from hybrimoe.sim.bound import exact_layer_point, fluid_bound, forward_bound, forward_items, layer_point
from hybrimoe.sim.costs import UniformCosts
from hybrimoe.sim.metrics import ForwardLog, LayerLog


# -- an independent exact LP solver (two-phase simplex, Bland's rule, rational arithmetic) ----------
def lp_min(c: list, a: list[list], b: list) -> Fraction:
    """min c.x s.t. a x <= b, x >= 0, solved exactly; the LP must be feasible and bounded."""
    m, n = len(a), len(c)
    arts = [i for i in range(m) if b[i] < 0]
    width = n + m + len(arts)
    rows, basis = [], []
    for i in range(m):
        sign = -1 if b[i] < 0 else 1
        row = [Fraction(0)] * (width + 1)
        for j in range(n):
            row[j] = sign * Fraction(a[i][j])
        row[n + i] = Fraction(sign)  # slack
        row[width] = sign * Fraction(b[i])
        if sign < 0:
            k = n + m + arts.index(i)
            row[k] = Fraction(1)
            basis.append(k)
        else:
            basis.append(n + i)
        rows.append(row)

    def pivot(r: int, col: int) -> None:
        rows[r] = [v / rows[r][col] for v in rows[r]]
        for i, row in enumerate(rows):
            if i != r and row[col] != 0:
                f = row[col]
                rows[i] = [vi - f * vr for vi, vr in zip(row, rows[r])]
        basis[r] = col

    def solve(cost: list[Fraction], allowed: range) -> None:
        while True:
            enter = next((j for j in allowed if j not in basis and
                          cost[j] - sum(cost[basis[i]] * rows[i][j] for i in range(m)) < 0), None)
            if enter is None:
                return
            ratios = [(rows[i][width] / rows[i][enter], basis[i], i) for i in range(m) if rows[i][enter] > 0]
            assert ratios, "unbounded LP"
            pivot(min(ratios)[2], enter)

    solve([Fraction(0)] * (n + m) + [Fraction(1)] * len(arts), range(width))
    assert all(rows[i][width] == 0 for i in range(m) if basis[i] >= n + m), "infeasible LP"
    for r in range(m):
        if basis[r] >= n + m:
            col = next((j for j in range(n + m) if rows[r][j] != 0), None)
            if col is not None:
                pivot(r, col)
    cost = [Fraction(x) for x in c] + [Fraction(0)] * (width - n)
    solve(cost, range(n + m))
    return sum(cost[basis[i]] * rows[i][width] for i in range(m))


class Rows:
    """Constraints a x <= b over n variables, added as {column: coefficient}; variable 0 is minimised."""

    def __init__(self, n: int) -> None:
        self.n, self.a, self.b = n, [], []

    def add(self, entries: dict[int, float], rhs: float) -> None:
        r = [0.0] * self.n
        for j, v in entries.items():
            r[j] += v
        self.a.append(r)
        self.b.append(rhs)

    def minimise_first(self) -> Fraction:
        return lp_min([1.0] + [0.0] * (self.n - 1), self.a, self.b)


def fluid_lp(dense: float, layers: list[tuple[float, float, tuple]], link: bool = True) -> Fraction:
    """The module docstring's LP, written out: variables T, z_l, m_l (largest CPU share of layer l,
    which pays the surcharge s_l), y_e (GPU fraction of expert e); `link`: with the link row."""
    n_layers = len(layers)
    experts = [(l, item) for l, (_, _, items) in enumerate(layers) for item in items]
    n = 1 + 2 * n_layers + len(experts)
    m = {l: 1 + n_layers + l for l in range(n_layers)}
    y = {i: 1 + 2 * n_layers + i for i in range(len(experts))}
    rows = Rows(n)
    row = rows.add
    row({0: -1.0, **{1 + l: 1.0 for l in range(n_layers)}}, -dense)  # D + sum z_l <= T
    for l, (_, s, items) in enumerate(layers):
        mine = [i for i, (layer, _) in enumerate(experts) if layer == l]
        cpu = {1 + l: -1.0, m[l]: s, **{y[i]: -experts[i][1][0] for i in mine}}
        row(cpu, -sum(a for a, _, _ in items))  # sum a (1 - y) + s m_l <= z_l
        row({1 + l: -1.0, **{y[i]: experts[i][1][1] for i in mine}}, 0.0)  # sum g y <= z_l
        for i in mine:
            row({m[l]: -1.0, y[i]: -1.0}, -1.0)  # m_l >= 1 - y_e
        row({m[l]: 1.0}, 1.0)  # m_l <= 1
    if link:
        row({0: -1.0, **{y[i]: layers[l][0] for i, (l, (_, _, miss)) in enumerate(experts) if miss}}, 0.0)
    for i in range(len(experts)):
        row({y[i]: 1.0}, 1.0)
    return rows.minimise_first()


def hull_lp(dense: float, layers: list[tuple[float, float, tuple]]) -> Fraction:
    """The integral program with relaxations 2-5, convexified per layer, written out: variables T, z_l,
    and w_{l,S} >= 0 (sum 1 per layer) over every assignment S (CPU set) of layer l's experts, with
    span_S = max(sum_S a + s [S not empty], sum_{not S} g) <= z_l on average and the link's copies
    c_l K_S; its value is the Lagrangian dual that `fluid_bound(..., exact_items)` computes."""
    options = []
    for copy, s, items in layers:
        rows = []
        for cpu_set in itertools.product((False, True), repeat=len(items)):
            cpu = sum(a for (a, _, _), c in zip(items, cpu_set) if c) + (s if any(cpu_set) else 0.0)
            gpu = sum(g for (_, g, _), c in zip(items, cpu_set) if not c)
            rows.append((max(cpu, gpu), copy * sum(miss for (_, _, miss), c in zip(items, cpu_set) if not c)))
        options.append(rows)
    n_layers = len(layers)
    w = {}
    for l, rows in enumerate(options):
        for k in range(len(rows)):
            w[l, k] = 1 + n_layers + len(w)
    constraints = Rows(1 + n_layers + len(w))
    row = constraints.add
    row({0: -1.0, **{1 + l: 1.0 for l in range(n_layers)}}, -dense)  # D + sum z_l <= T
    for l, rows in enumerate(options):
        row({1 + l: -1.0, **{w[l, k]: span for k, (span, _) in enumerate(rows)}}, 0.0)  # sum w span <= z_l
        row({w[l, k]: 1.0 for k in range(len(rows))}, 1.0)  # sum w = 1
        row({w[l, k]: -1.0 for k in range(len(rows))}, -1.0)
    row({0: -1.0, **{w[l, k]: link for l, rows in enumerate(options) for k, (_, link) in enumerate(rows)}}, 0.0)
    return constraints.minimise_first()


# -- helpers -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaledFirstCosts:
    """Costs whose first CPU expert is `penalty` times slower (as in a profile): the surcharge grows
    with the expert's load, so a layer's experts have different surcharges."""

    cpu_per_token: float
    gpu_fixed: float
    copy_seconds: float
    penalty: float
    cpu_fixed: float = 0.0

    def cpu(self, tokens: int, first: bool) -> float:
        return (self.cpu_fixed + self.cpu_per_token * tokens) * (self.penalty if first else 1.0)

    def gpu(self, tokens: int) -> float:
        return self.gpu_fixed

    def copy(self) -> float:
        return self.copy_seconds


def _forward(dense: float, layers: list[tuple[dict[int, int], set[int]]]) -> ForwardLog:
    log = ForwardLog("decode", 1, 0, dense, 0.0)
    log.layers = [LayerLog(l, counts, frozenset(res)) for l, (counts, res) in enumerate(layers)]
    return log


def _random_case(rng: random.Random, max_experts: int):
    copy = rng.choice([0.0, rng.uniform(0.1, 3.0)])
    if rng.random() < 0.5:
        costs = LinearCosts(cpu_per_token=rng.uniform(0.1, 2.0), gpu_fixed=rng.uniform(0.02, 1.0), copy_seconds=copy,
                            cpu_fixed=rng.uniform(0.0, 1.0), cpu_first_extra=rng.choice([0.0, rng.uniform(0.0, 2.0)]),
                            gpu_per_token=rng.uniform(0.0, 0.2))
    else:
        costs = ScaledFirstCosts(cpu_per_token=rng.uniform(0.1, 1.0), gpu_fixed=rng.uniform(0.05, 2.0),
                                 copy_seconds=copy, penalty=rng.uniform(1.0, 2.0), cpu_fixed=rng.uniform(0.0, 0.5))
    layers = []
    for _ in range(rng.randint(1, 3)):
        counts = {e: rng.randint(1, 9) for e in rng.sample(range(8), rng.randint(1, max_experts))}
        layers.append((counts, {e for e in counts if rng.random() < 0.4}))
    return UniformCosts(costs), _forward(rng.choice([0.0, rng.uniform(0.0, 3.0)]), layers)


def _brute_force_layer(counts: dict[int, int], cached: set[int], costs) -> float:
    """Best makespan over every assignment, GPU order, copy order and CPU order (link free at start);
    the CPU's first expert pays its true first-expert cost."""
    best = float("inf")
    experts = sorted(counts)
    for mask in range(2 ** len(experts)):
        gpu = [e for i, e in enumerate(experts) if mask >> i & 1]
        cpu = [e for e in experts if e not in gpu]
        for gpu_order in itertools.permutations(gpu):
            for copies in itertools.permutations([e for e in gpu if e not in cached]):
                for cpu_order in itertools.permutations(cpu):
                    plan = build_plan(0, counts, gpu_order, copies, cpu_order, costs)
                    best = min(best, plan.makespan)
    return best


def _without_surcharge(layers: list[tuple[float, float, tuple]]) -> list[tuple[float, float, tuple]]:
    return [(copy, 0.0, items) for copy, _, items in layers]


# -- one layer --------------------------------------------------------------------------------------------
def test_layer_point_is_a_primal_dual_pair():
    """dual = max(C, G) + p K of the recovered point, and no feasible point (y, m = largest CPU share)
    is below the dual (weak duality), with and without a surcharge."""
    rng = random.Random(5)
    cases = {"no surcharge": 0, "surcharge binds": 0}
    for _ in range(600):
        items = tuple((rng.uniform(0, 2), rng.uniform(0.01, 2), rng.random() < 0.5) for _ in range(rng.randint(1, 7)))
        p = rng.choice([0.0, rng.uniform(0, 3), float("inf")])
        s = rng.choice([0.0, rng.uniform(0, 0.3), rng.uniform(0, 3)])
        pt = layer_point(items, p, s)
        if p == float("inf"):
            assert pt.copied == 0.0
            continue
        assert pt.dual == pytest.approx(pt.span + p * pt.copied, rel=1e-9, abs=1e-12)
        for _ in range(20):
            ys = [rng.choice([0.0, 1.0, rng.random()]) for _ in items]
            cpu = sum(a * (1 - v) for (a, _, _), v in zip(items, ys)) + s * max(1 - v for v in ys)
            gpu = sum(g * v for (_, g, _), v in zip(items, ys))
            assert pt.dual <= max(cpu, gpu) + p * sum(v for (_, _, miss), v in zip(items, ys) if miss) + 1e-12
        no_s = layer_point(items, p)
        assert pt.dual >= no_s.dual * (1 - 1e-12)
        cases["no surcharge" if s == 0 else "surcharge binds"] += pt.dual > no_s.dual * (1 + 1e-6)
    assert cases["no surcharge"] == 0 and cases["surcharge binds"] >= 100, cases


# -- properties on random small forwards ----------------------------------------------------------------
def test_bound_is_the_exact_lp_value_on_random_forwards():
    rng = random.Random(0)
    for _ in range(120):
        costs, f = _random_case(rng, max_experts=4)
        layers = forward_items(f, costs)
        b = forward_bound(f, costs, exact_items=0)  # the pure fluid LP
        lp = float(fluid_lp(f.dense_seconds, layers))
        assert b.seconds == pytest.approx(lp, rel=1e-9, abs=1e-12), (f, costs)
        assert b.seconds <= b.upper * (1 + 1e-12) and b.upper == pytest.approx(lp, rel=1e-9, abs=1e-12)
        assert b.no_link_seconds == pytest.approx(float(fluid_lp(f.dense_seconds, layers, link=False)), rel=1e-9)


def test_bound_is_below_every_integral_schedule_and_above_weaker_bounds():
    rng = random.Random(1)
    sched = OptimalScheduler(max_experts=10)
    tight = {"link": 0, "surcharge": 0}
    for i in range(150):
        costs, f = _random_case(rng, max_experts=3 if i < 60 else 6)
        b = forward_bound(f, costs)
        exact = f.dense_seconds
        for layer in f.layers:
            cached = set(layer.resident)
            best = sched.plan(layer.layer, layer.counts, cached, costs.expert).makespan
            if i < 60:  # small layers: every assignment and order, to check the planner's optimum too
                assert _brute_force_layer(layer.counts, cached, costs.expert) == pytest.approx(best, rel=1e-12)
            exact += best
        assert b.seconds <= exact * (1 + 1e-12), (f, costs)
        old = fluid_bound(f.dense_seconds, _without_surcharge(forward_items(f, costs)))
        assert b.seconds >= old.seconds * (1 - 1e-12) and b.no_link_seconds >= old.no_link_seconds * (1 - 1e-12)
        assert b.seconds >= b.no_link_seconds * (1 - 1e-12) and b.seconds >= f.dense_seconds
        tight["link"] += b.seconds > b.no_link_seconds * (1 + 1e-6)
        tight["surcharge"] += b.seconds > old.seconds * (1 + 1e-6)
    assert tight["link"] >= 15 and tight["surcharge"] >= 40, tight  # both terms matter on a good share


def test_the_search_closes_on_costs_with_exact_breakpoints():
    """Costs in quarters and eighths: lines meet exactly on a bracket's end, where the search stops;
    the feasible point found there must still close the gap (seconds = upper = the LP value)."""
    rng = random.Random(3)
    for i in range(1500):
        layers = []
        for _ in range(rng.randint(1, 3)):
            items = tuple(sorted((rng.randint(1, 8) / 4, rng.randint(1, 8) / 8, rng.random() < 0.6)
                                 for _ in range(rng.randint(1, 3))))
            layers.append((rng.randint(1, 16) / 4, rng.choice([0.0, rng.randint(1, 4) / 4]), items))
        dense = rng.choice([0.0, rng.randint(1, 8) / 4])
        b = fluid_bound(dense, layers)
        assert b.upper <= b.seconds * (1 + 1e-12), (dense, layers, b)
        if i < 40:
            assert b.seconds == pytest.approx(float(fluid_lp(dense, layers)), rel=1e-12)


def test_integral_layers_give_the_exact_lagrangian_dual_and_stay_between_the_lp_and_the_optimum():
    """With small layers integral (`forward_bound`'s default), the bound equals the LP over each layer's
    assignments (an independent exact simplex, `hull_lp`), is at least the fluid LP, and is tighter than
    it on a good share of random forwards (so the strengthening is not vacuous)."""
    rng = random.Random(7)
    tighter = 0
    for _ in range(60):
        costs, f = _random_case(rng, max_experts=3)
        layers = forward_items(f, costs)
        b = forward_bound(f, costs)
        assert b.seconds == pytest.approx(float(hull_lp(f.dense_seconds, layers)), rel=1e-9, abs=1e-12), (f, costs)
        lp = forward_bound(f, costs, exact_items=0).seconds
        assert b.seconds >= lp * (1 - 1e-12)
        tighter += b.seconds > lp * (1 + 1e-6)
    assert tighter >= 15, tighter


def test_exact_layer_point_is_the_minimum_over_assignments():
    """One layer at link price p: the minimum of max(C, G) + p K over every assignment (written out here
    independently), ties to fewer copies; at p = inf only copy-free assignments; never below layer_point."""
    rng = random.Random(8)
    for _ in range(300):
        items = tuple((rng.uniform(0, 2), rng.uniform(0.01, 2), rng.random() < 0.5) for _ in range(rng.randint(1, 5)))
        p = rng.choice([0.0, rng.uniform(0, 3), float("inf")])
        s = rng.choice([0.0, rng.uniform(0, 2)])
        best = None
        for cpu_set in itertools.product((False, True), repeat=len(items)):
            cpu = sum(a for (a, _, _), c in zip(items, cpu_set) if c) + (s if any(cpu_set) else 0.0)
            gpu = sum(g for (_, g, _), c in zip(items, cpu_set) if not c)
            k = sum(miss for (_, _, miss), c in zip(items, cpu_set) if not c)
            if p == float("inf") and k:
                continue
            value = max(cpu, gpu) + (0.0 if p == float("inf") else p * k)
            if best is None or (value, k) < best[:2]:
                best = (value, k, max(cpu, gpu))
        pt = exact_layer_point(items, p, s)
        assert (pt.dual, pt.copied, pt.span) == pytest.approx(best)
        if p != float("inf"):
            assert pt.dual >= layer_point(items, p, s).dual * (1 - 1e-12)
