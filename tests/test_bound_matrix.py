"""Over the whole `hybrimoe bench` matrix (every policy x model x cache ratio x prompt length, eval
traces, paper-a6000, the bench's tuned settings), plus `resident` (every expert on the GPU: the
cache content farthest from the others, so a bound computed on another row's cache content shows):
no row is faster than the lower bound for the cache content its own run held. One simulation
of the matrix (~45 s of CPU) is shared by the assertions."""

import dataclasses

import pytest

from hybrimoe.sim.bench import BenchConfig, _setups, main_block, summarise
from hybrimoe.sim.runner import BOUND, BOUND_OF

CONFIG = dataclasses.replace(BenchConfig(), policies=BenchConfig().policies + ("resident",))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out: list[dict] = []
    for model, setups in _setups(CONFIG).items():
        out += main_block(CONFIG, model, setups)
    return out


def _key(r: dict) -> str:
    return "ttft_seconds" if r["phase"] == "prefill" else "tbt_seconds"


def test_the_matrix_is_complete(rows):
    models = {r["model"] for r in rows}
    assert len(models) == 3
    for policy in CONFIG.policies + (BOUND,):
        mine = [r for r in rows if r["policy"] == policy]
        assert len(mine) == len(models) * len(CONFIG.ratios) * (len(CONFIG.prompts) + 1), policy


def test_no_row_is_faster_than_its_own_bound(rows):
    below = [(r["model"], r["policy"], r["cache_ratio"], r.get("prompt_tokens"), r[_key(r)], r["bound_" + _key(r)])
             for r in rows if r[_key(r)] < r["bound_" + _key(r)] * (1 - 1e-9)]
    assert not below, below


def test_bound_rows_are_hybrimoes_bounds(rows):
    by_key = {(r["model"], r["cache_ratio"], r["phase"], r.get("prompt_tokens"), r["policy"]): r for r in rows}
    for r in rows:
        if r["policy"] != BOUND:
            continue
        hyb = by_key[(r["model"], r["cache_ratio"], r["phase"], r.get("prompt_tokens"), BOUND_OF)]
        assert r[_key(r)] == hyb["bound_" + _key(r)] <= hyb[_key(r)]


def test_summary_reports_the_share_of_the_bound_reached(rows):
    summary = summarise(rows)
    assert summary[BOUND]["decode_bound_share"] == 1.0
    for policy, s in summary.items():
        assert 0 < s["prefill_bound_share"] <= 1 and 0 < s["decode_bound_share"] <= 1, policy
