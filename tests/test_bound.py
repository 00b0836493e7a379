"""The lower bound (hybrimoe.sim.bound): hand-computed values and simulated runs (the exact LP
value and the comparison with integral schedules are in test_bound_lp.py)."""

import json
import logging

import pytest
from test_bound_lp import ScaledFirstCosts, _brute_force_layer, _forward

from hybrimoe.cli import main
from hybrimoe.data import packaged_traces
from hybrimoe.policy.pipeline import LayerView
from hybrimoe.policy.plan import LinearCosts
from hybrimoe.policy.presets import PRESETS, get_preset
from hybrimoe.sim.bench import BenchConfig, _setups, main_block, summarise
from hybrimoe.sim.bound import fluid_bound, forward_bound, forward_items
from hybrimoe.sim.costs import UniformCosts
from hybrimoe.sim.report import markdown
from hybrimoe.sim.runner import make_setup, simulate_one
from hybrimoe.sim.simulator import bound_residents
from hybrimoe.trace.format import RoutingTrace


# -- hand-computed values ------------------------------------------------------------------------------
def test_the_link_binds_when_copies_are_long():
    # one miss: CPU 1 s, GPU 0.1 s, copy 10 s. Without the link: y = 1/1.1 on the GPU, 0.0909 s. With
    # it: T = max(1 - y, 10 y) -> y = 1/11, T = 10/11.
    b = fluid_bound(0.0, [(10.0, 0.0, ((1.0, 0.1, True),))])
    assert b.seconds == pytest.approx(10 / 11, rel=1e-12) and b.upper == pytest.approx(10 / 11, rel=1e-12)
    assert b.no_link_seconds == pytest.approx(0.1 / 1.1, rel=1e-12)


def test_the_dense_part_adds_and_the_link_covers_the_whole_forward():
    # D = 2 s: T = max(2 + 1 - y, 10 y) -> y = 3/11, T = 30/11 (the link may work during the dense part)
    assert fluid_bound(2.0, [(10.0, 0.0, ((1.0, 0.1, True),))]).seconds == pytest.approx(30 / 11, rel=1e-12)


def test_residents_may_move_to_the_cpu():
    # two residents, 1 s each on either side: one on each (fractionally, half and half) -> 1 s, not 2
    assert fluid_bound(0.0, [(5.0, 0.0, ((1.0, 1.0, False), (1.0, 1.0, False)))]).seconds == pytest.approx(1.0)
    # a resident and a miss (CPU 1 s, GPU 0.1 s, copy 0.5 s): the resident goes to the GPU, the miss
    # splits: T = max(1 - y, 0.1 + 0.1 y, 0.5 y) -> y = 2/3, T = 1/3
    b = fluid_bound(0.0, [(0.5, 0.0, ((1.0, 0.1, True), (1.0, 0.1, False)))])
    assert b.seconds == pytest.approx(1 / 3, rel=1e-12)


def test_a_layer_that_may_run_experts_on_the_cpu_pays_its_smallest_surcharge():
    # two misses of 1 token: CPU 1 s (first: +5 s), GPU 10 s, free copies. Without the surcharge the
    # fluid optimum moves 2/11 experts to the GPU: max(2 - 2/11, 20/11) = 20/11 s. With it (s = 5):
    # both at CPU share m, C = 2 m + 5 m, G = 10 (2 - 2 m) -> m = 20/27, T = 140/27 = 5.19 s
    costs = UniformCosts(LinearCosts(cpu_per_token=1.0, gpu_fixed=10.0, copy_seconds=0.0, cpu_first_extra=5.0))
    f = _forward(0.0, [({0: 1, 1: 1}, set())])
    assert forward_bound(f, costs, exact_items=0).seconds == pytest.approx(140 / 27, rel=1e-12)
    # with the layer integral (forward_bound's default for small layers): both on the CPU, 1 + 1 + 5
    assert forward_bound(f, costs).seconds == pytest.approx(7.0, rel=1e-12)
    assert fluid_bound(0.0, [(0.0, 0.0, ((1.0, 10.0, True),) * 2)]).seconds == pytest.approx(20 / 11, rel=1e-12)
    # and the real optimum pays the surcharge once: 1 + 6 = 7 s on the CPU, or 10 s on the GPU
    assert _brute_force_layer({0: 1, 1: 1}, set(), costs.expert) == pytest.approx(7.0)


def test_the_surcharge_is_the_smallest_of_the_layer_and_meets_the_link():
    # first CPU expert 2x slower (as in a profile): two misses of 1 and 3 tokens, CPU 1 s and 3 s
    # (surcharges 1 s and 3 s: s = 1 s), GPU 0.1 s each, copies 4 s. CPU shares zA, zB <= m:
    # T = max(C, link) = max(zA + 3 zB + m, 4 (2 - zA - zB)); the 1-token expert goes first:
    # zA = m = 1, then 2 + 3 zB = 4 - 4 zB -> zB = 2/7, T = 20/7 s (16/7 without s, 4 with s = 3).
    # Without the link B goes to the GPU and A shares: 2 zA = 0.1 (2 - zA) -> 4/21 s.
    # The best integral schedule: A on the CPU (2 s), B copied (4 + 0.1 s): 4.1 s.
    costs = UniformCosts(ScaledFirstCosts(cpu_per_token=1.0, gpu_fixed=0.1, copy_seconds=4.0, penalty=2.0))
    f = _forward(0.0, [({0: 1, 1: 3}, set())])
    assert forward_items(f, costs) == [(4.0, 1.0, ((1.0, 0.1, True), (3.0, 0.1, True)))]
    b = forward_bound(f, costs, exact_items=0)
    assert b.seconds == pytest.approx(20 / 7, rel=1e-12) and b.no_link_seconds == pytest.approx(4 / 21, rel=1e-12)
    # integral: without the link both on the GPU (0.2 s); with it, time-sharing "A on the CPU, B copied"
    # (2 s, 4 s of link) with "both on the CPU" (1 + 3 + 1 = 5 s, no link) still meets at 20/7 s
    b = forward_bound(f, costs)
    assert b.seconds == pytest.approx(20 / 7, rel=1e-12) and b.no_link_seconds == pytest.approx(0.2, rel=1e-12)
    assert _brute_force_layer({0: 1, 1: 3}, set(), costs.expert) == pytest.approx(4.1)


def test_a_layer_whose_cpu_runs_nothing_pays_no_surcharge():
    # two residents, GPU 0.1 s each, CPU 1 s (+5 s first): the best schedule runs both on the GPU,
    # 0.2 s. The fluid optimum moves shares m of both to the CPU: 2 m + 5 m = 0.2 (1 - m) -> 7/36 s
    costs = UniformCosts(LinearCosts(cpu_per_token=1.0, gpu_fixed=0.1, copy_seconds=1.0, cpu_first_extra=5.0))
    f = _forward(0.5, [({0: 1, 1: 1}, {0, 1})])
    assert forward_bound(f, costs, exact_items=0).seconds == pytest.approx(0.5 + 7 / 36, rel=1e-12)
    assert forward_bound(f, costs).seconds == pytest.approx(0.5 + 0.2, rel=1e-12)  # integral: both on the GPU
    assert _brute_force_layer({0: 1, 1: 1}, {0, 1}, costs.expert) == pytest.approx(0.2)


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
        assert b.seconds >= b.dense_seconds > 0 and b.upper <= b.seconds * (1 + 1e-9)  # the LP value, closed
    assert result.bound_ttft_seconds <= result.ttft_seconds and result.bound_tbt_seconds <= result.tbt_seconds


def test_bound_row_is_the_hybrimoe_runs_bound(capsys):
    path = str(packaged_traces("qwen1.5-moe-a2.7b", "eval")[0].path)
    assert main(["simulate", "--trace", path, "--policy", "hybrimoe,bound", "--prompt-tokens", "32",
                 "--max-decode", "4", "--json"]) == 0
    hyb, bound = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert bound["policy"] == "bound" and "lower bound for the cache content" in bound["notes"][0]
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


def test_a_copy_begun_before_the_forward_counts_as_resident_to_its_bound():
    """A prefetch issued in an earlier forward and still on the link at this layer's access spent part
    of its link time before this forward: charging it a whole copy here could put the bound above the
    policy, so it counts as resident. One issued within this forward and still in flight is a miss."""
    view = LayerView(cached={1}, arrivals={2: 0.5, 3: 0.7}, copy_free_at=0.0)
    held = {(4, 1), (4, 2), (5, 3)}  # (4, 2) was held (in flight) when the forward began; (4, 3) was not
    assert bound_residents(4, view, held) == {1, 2}
    assert bound_residents(4, view, set()) == {1}
