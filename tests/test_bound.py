"""The fluid lower bound (hybrimoe.sim.bound): hand-computed values, the exact LP value (checked
against an independent exact simplex), and below every integral schedule (brute force)."""

import itertools
import json
import logging
import random
from fractions import Fraction

import pytest

from hybrimoe.cli import main
from hybrimoe.data import packaged_traces
from hybrimoe.policy.optimal import OptimalScheduler
from hybrimoe.policy.plan import LinearCosts, build_plan
from hybrimoe.policy.presets import PRESETS, get_preset
from hybrimoe.sim.bench import BenchConfig, _setups, main_block, summarise
from hybrimoe.sim.bound import fluid_bound, forward_bound, forward_items, layer_point
from hybrimoe.sim.costs import UniformCosts
from hybrimoe.sim.metrics import ForwardLog, LayerLog
from hybrimoe.sim.report import markdown
from hybrimoe.sim.runner import make_setup, simulate_one
from hybrimoe.trace.format import RoutingTrace


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


def fluid_lp(dense: float, layers: list[tuple[float, tuple]]) -> Fraction:
    """The module docstring's LP, written out: variables T, z_l, y_e (GPU fraction of expert e)."""
    n_layers = len(layers)
    experts = [(l, item) for l, (_, items) in enumerate(layers) for item in items]
    n = 1 + n_layers + len(experts)
    y = {i: 1 + n_layers + i for i in range(len(experts))}
    a_rows, b = [], []
    time_row = [-1.0] + [0.0] * (n - 1)
    for l in range(n_layers):
        time_row[1 + l] = 1.0
    a_rows.append(time_row)
    b.append(-dense)  # D + sum z_l <= T
    for l in range(n_layers):
        cpu, gpu = [0.0] * n, [0.0] * n
        cpu[1 + l] = gpu[1 + l] = -1.0
        for i, (layer, (a, g, miss)) in enumerate(experts):
            if layer == l:
                cpu[y[i]], gpu[y[i]] = -a, g
        a_rows += [cpu, gpu]
        b += [-sum(a for a, _, _ in layers[l][1]), 0.0]  # sum a (1 - y) <= z_l, sum g y <= z_l
    link = [0.0] * n
    link[0] = -1.0
    for i, (layer, (a, g, miss)) in enumerate(experts):
        link[y[i]] = layers[layer][0] if miss else 0.0
    a_rows.append(link)
    b.append(0.0)  # copy seconds of copied fractions <= T
    for i in range(len(experts)):
        cap = [0.0] * n
        cap[y[i]] = 1.0
        a_rows.append(cap)
        b.append(1.0)
    return lp_min([1.0] + [0.0] * (n - 1), a_rows, b)


# -- helpers -----------------------------------------------------------------------------------------
def _forward(dense: float, layers: list[tuple[dict[int, int], set[int]]]) -> ForwardLog:
    log = ForwardLog("decode", 1, 0, dense, 0.0)
    log.layers = [LayerLog(l, counts, frozenset(res)) for l, (counts, res) in enumerate(layers)]
    return log


def _random_case(rng: random.Random, max_experts: int):
    costs = LinearCosts(cpu_per_token=rng.uniform(0.1, 2.0), gpu_fixed=rng.uniform(0.02, 1.0),
                        copy_seconds=rng.choice([0.0, rng.uniform(0.1, 3.0)]), cpu_fixed=rng.uniform(0.0, 1.0),
                        cpu_first_extra=rng.choice([0.0, rng.uniform(0.0, 2.0)]),
                        gpu_per_token=rng.uniform(0.0, 0.2))
    layers = []
    for _ in range(rng.randint(1, 3)):
        counts = {e: rng.randint(1, 9) for e in rng.sample(range(8), rng.randint(1, max_experts))}
        layers.append((counts, {e for e in counts if rng.random() < 0.4}))
    return UniformCosts(costs), _forward(rng.choice([0.0, rng.uniform(0.0, 3.0)]), layers)


def _brute_force_layer(counts: dict[int, int], cached: set[int], costs: LinearCosts) -> float:
    """Best makespan over every assignment, GPU order, copy order and CPU order (link free at start)."""
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


def _no_link_balance(items) -> float:
    """min over fractions of max(CPU, GPU) for one layer, by the ratio rule (independent of bound.py):
    move experts to the GPU in descending cpu/gpu ratio until the CPU's and GPU's work meet."""
    cpu, gpu = sum(a for a, _, _ in items), 0.0
    for a, g, _ in sorted(items, key=lambda t: -t[0] / t[1]):
        if gpu + g >= cpu - a:  # the balance point is inside this expert
            return gpu + g * (cpu - gpu) / (a + g)
        cpu, gpu = cpu - a, gpu + g
    return max(cpu, gpu)


# -- hand-computed values ------------------------------------------------------------------------------
def test_the_link_binds_when_copies_are_long():
    # one miss: CPU 1 s, GPU 0.1 s, copy 10 s. Without the link: y = 1/1.1 on the GPU, 0.0909 s. With
    # it: T = max(1 - y, 10 y) -> y = 1/11, T = 10/11.
    b = fluid_bound(0.0, [(10.0, ((1.0, 0.1, True),))])
    assert b.seconds == pytest.approx(10 / 11, rel=1e-12) and b.upper == pytest.approx(10 / 11, rel=1e-12)
    assert b.no_link_seconds == pytest.approx(0.1 / 1.1, rel=1e-12)


def test_the_dense_part_adds_and_the_link_covers_the_whole_forward():
    # D = 2 s: T = max(2 + 1 - y, 10 y) -> y = 3/11, T = 30/11 (the link may work during the dense part)
    assert fluid_bound(2.0, [(10.0, ((1.0, 0.1, True),))]).seconds == pytest.approx(30 / 11, rel=1e-12)


def test_residents_may_move_to_the_cpu():
    # two residents, 1 s each on either side: one on each (fractionally, half and half) -> 1 s, not 2
    assert fluid_bound(0.0, [(5.0, ((1.0, 1.0, False), (1.0, 1.0, False)))]).seconds == pytest.approx(1.0)
    # a resident and a miss (CPU 1 s, GPU 0.1 s, copy 0.5 s): the resident goes to the GPU, the miss
    # splits: T = max(1 - y, 0.1 + 0.1 y, 0.5 y) -> y = 2/3, T = 1/3
    b = fluid_bound(0.0, [(0.5, ((1.0, 0.1, True), (1.0, 0.1, False)))])
    assert b.seconds == pytest.approx(1 / 3, rel=1e-12)


def test_cpu_experts_are_charged_the_non_first_cost():
    # two misses of 1 token: CPU 1 s (first: +5 s), GPU 10 s, free copies: the fluid optimum moves
    # s = 2/11 experts to the GPU: max(2 - s, 10 s) = 20/11 with the non-first cost
    costs = UniformCosts(LinearCosts(cpu_per_token=1.0, gpu_fixed=10.0, copy_seconds=0.0, cpu_first_extra=5.0))
    f = _forward(0.0, [({0: 1, 1: 1}, set())])
    assert forward_bound(f, costs).seconds == pytest.approx(20 / 11, rel=1e-12)
    # and the real optimum pays the surcharge once: 1 + 6 = 7 s on the CPU, or 10 s on the GPU
    assert _brute_force_layer({0: 1, 1: 1}, set(), costs.expert) == pytest.approx(7.0)


def test_layer_point_is_a_primal_dual_pair():
    rng = random.Random(5)
    for _ in range(300):
        items = tuple((rng.uniform(0, 2), rng.uniform(0.01, 2), rng.random() < 0.5) for _ in range(rng.randint(1, 7)))
        p = rng.choice([0.0, rng.uniform(0, 3), float("inf")])
        pt = layer_point(items, p)
        primal = pt.span + (0.0 if p == float("inf") else p * pt.copied)
        assert pt.dual == pytest.approx(primal, rel=1e-9, abs=1e-12)
        if p == float("inf"):
            assert pt.copied == 0.0


# -- properties on random small forwards ----------------------------------------------------------------
def test_bound_is_the_exact_lp_value_on_random_forwards():
    rng = random.Random(0)
    for _ in range(120):
        costs, f = _random_case(rng, max_experts=4)
        b = forward_bound(f, costs)
        lp = float(fluid_lp(f.dense_seconds, forward_items(f, costs)))
        assert b.seconds == pytest.approx(lp, rel=1e-9, abs=1e-12), (f, costs)
        assert b.seconds <= b.upper * (1 + 1e-12) and b.upper == pytest.approx(lp, rel=1e-9, abs=1e-12)


def test_bound_is_below_every_integral_schedule_and_above_weaker_bounds():
    rng = random.Random(1)
    sched = OptimalScheduler(max_experts=10)
    tight = 0
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
        weaker = f.dense_seconds + sum(_no_link_balance(items) for _, items in forward_items(f, costs))
        assert b.no_link_seconds == pytest.approx(weaker, rel=1e-9)
        assert b.seconds >= weaker * (1 - 1e-12) and b.seconds >= f.dense_seconds
        tight += b.seconds > weaker * (1 + 1e-6)
    assert tight >= 20  # the link term matters on a good share of the cases


# -- on simulated runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_setup():
    t = packaged_traces("qwen1.5-moe-a2.7b", "eval")[0]
    return make_setup(RoutingTrace.load(t.path), t.path.name, None, "paper-a6000", t.path)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_no_simulated_forward_beats_its_bound(qwen_setup, name):
    result, sim = simulate_one(qwen_setup, name, 0.25, 48, 12, horizon=1, mrs_alpha=0.1)
    for f in sim.forwards:
        b = forward_bound(f, qwen_setup.costs)
        assert b.seconds <= f.seconds * (1 + 1e-9), (name, f.phase, b, f.seconds)
        assert b.seconds >= b.dense_seconds > 0
    assert result.bound_ttft_seconds <= result.ttft_seconds and result.bound_tbt_seconds <= result.tbt_seconds


def test_bound_row_is_the_hybrimoe_runs_bound(capsys):
    path = str(packaged_traces("qwen1.5-moe-a2.7b", "eval")[0].path)
    assert main(["simulate", "--trace", path, "--policy", "hybrimoe,bound", "--prompt-tokens", "32",
                 "--max-decode", "4", "--json"]) == 0
    hyb, bound = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert bound["policy"] == "bound" and "fluid lower bound" in bound["notes"][0]
    assert bound["ttft_seconds"] == hyb["bound_ttft_seconds"] < hyb["ttft_seconds"]
    assert bound["tbt_seconds"] == hyb["bound_tbt_seconds"] < hyb["tbt_seconds"]
    assert main(["simulate", "--trace", path, "--policy", "bound", "--max-decode", "2"]) == 0
    assert "reach" in capsys.readouterr().out


def test_oracle_is_a_deprecated_alias_not_a_limit(caplog):
    assert "oracle" not in PRESETS and "not a limit" in get_preset("hybrimoe-oracle").description
    with caplog.at_level(logging.WARNING, logger="hybrimoe.policy.presets"):
        assert get_preset("oracle") is PRESETS["hybrimoe-oracle"]
    assert "deprecated" in caplog.text


def test_bench_tables_show_each_rows_bound_share_and_the_bound_rows():
    config = BenchConfig(policies=("hybrimoe", "ktransformers"), ratios=(0.25,), prompts=(16,), max_decode=3,
                         models=("qwen1.5-moe-a2.7b",), traces_per_model=1)
    (model, setups), = _setups(config).items()
    rows = main_block(config, model, setups)
    assert [(r["policy"], r["phase"]) for r in rows][-2:] == [("bound", "prefill"), ("bound", "decode")]
    doc = {"profile": "paper-a6000", "config": {"prompts": [16], "ratios": [0.25], "ablation_prompt": 16},
           "tuned": {}, "rows": rows, "summary": summarise(rows)}
    text = markdown(doc)
    kt = next(r for r in rows if r["policy"] == "ktransformers" and r["phase"] == "decode")
    share = kt["bound_tbt_seconds"] / kt["tbt_seconds"]
    assert f"| {kt['tbt_seconds'] * 1e3:.1f} (1.00x, {share:.0%}) |" in text
    bound = next(r for r in rows if r["policy"] == "bound" and r["phase"] == "decode")
    assert f"| {bound['tbt_seconds'] * 1e3:.1f} ({kt['tbt_seconds'] / bound['tbt_seconds']:.2f}x) |" in text
    assert "| bound | " in text and f"{doc['summary']['hybrimoe']['decode_bound_share']:.0%}" in text
