"""Batched decode over the `hybrimoe bench` matrix (every eval trace, model, cache ratio and bench policy,
plus `resident`) at batch 4 and 16, 4 decode steps per trace (to keep the run short; ~1 min of CPU):
no row is faster than the lower bound for its own cache content, and hybrimoe is never slower than
kTransformers at the same cache, batch and execution mode (kTransformers priced eager like it, as in
tests/test_orderings.py; its CUDA-graph decode is a different machine cost)."""

from __future__ import annotations

import dataclasses
from functools import cache

from hybrimoe.policy.presets import get_preset
from hybrimoe.sim.batch_bench import batch_block
from hybrimoe.sim.bench import BenchConfig, _decode, _setups
from hybrimoe.sim.runner import BOUND

CONFIG = dataclasses.replace(BenchConfig(), policies=BenchConfig().policies + ("resident",), batches=(4, 16),
                             batch_decode=4)


@cache
def _rows() -> tuple[list[dict], dict[tuple, float]]:
    """(batch-block rows, {(model, ratio, batch): kTransformers' eager TBT})."""
    rows, eager = [], {}
    kt = dataclasses.replace(get_preset("ktransformers"), cuda_graphs=False)
    short = dataclasses.replace(CONFIG, max_decode=CONFIG.batch_decode)
    for model, setups in _setups(CONFIG).items():
        rows += batch_block(CONFIG, model, setups)
        for ratio in CONFIG.ratios:
            for batch in CONFIG.batches:
                eager[(model, ratio, batch)] = _decode(setups, kt, ratio, short, batch=batch)["tbt_seconds"]
    return rows, eager


def test_the_batch_matrix_is_complete():
    rows, _ = _rows()
    for policy in CONFIG.policies + (BOUND,):
        mine = [r for r in rows if r["policy"] == policy]
        assert sorted({(r["model"], r["cache_ratio"], r["batch"]) for r in mine}) == sorted(
            (m, c, b) for m in {r["model"] for r in rows} for c in CONFIG.ratios for b in CONFIG.batches)
        assert len(mine) == 3 * 3 * 2 and all(r["decode_steps"] > 0 for r in mine), policy


def test_no_batched_row_is_faster_than_its_own_bound():
    rows, _ = _rows()
    below = [(r["model"], r["policy"], r["cache_ratio"], r["batch"], r["tbt_seconds"], r["bound_tbt_seconds"])
             for r in rows if r["tbt_seconds"] < r["bound_tbt_seconds"] * (1 - 1e-9)]
    assert not below, below


def test_hybrimoe_is_never_slower_than_ktransformers_at_the_same_cache_batch_and_execution_mode():
    rows, eager = _rows()
    hyb = {(r["model"], r["cache_ratio"], r["batch"]): r["tbt_seconds"] for r in rows if r["policy"] == "hybrimoe"}
    assert hyb.keys() == eager.keys()
    slower = [(k, round(hyb[k] / eager[k], 4)) for k in hyb if hyb[k] > eager[k] * (1 + 1e-9)]
    assert not slower, slower


def test_tokens_per_second_is_batch_over_tbt():
    rows, _ = _rows()
    for r in rows:
        assert r["tokens_per_second"] == r["batch"] / r["tbt_seconds"]
