"""Batched decode in the simulator: batch 1 is unchanged, the pieces a batch adds (dense part, LM head,
scheduler choice per preset) are priced as the docs say, and the CLI's --batch.

`tests/data/sim_batch1_reference.json` holds, for every eval trace and five presets (cache 0.25,
32-token prompt, 6 decode steps, the bench's tuned settings), (TTFT, TBT, hit rate, bytes copied, TBT
bound, total seconds, prefetch copies) as the simulator computed them BEFORE batching existed
(commit 49067d5; rewritten after the integral bound and L = 6 of commit 3677348, checked to differ
from the old file only in the bound and, for hybrimoe, by the look-ahead; rewritten again when copies begun
before a forward became residents to its bound: one hybrimoe bound changed); batch 1 must give exactly those. A deliberate change of batch-1 results rewrites it:
`.venv/bin/python tests/test_sim_batch.py --write`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hybrimoe.data import packaged_traces
from hybrimoe.policy.cost import CostModel
from hybrimoe.policy.presets import get_preset
from hybrimoe.policy.shape import ModelShape
from hybrimoe.sim.bench import TUNED
from hybrimoe.sim.costs import ProfileCosts
from hybrimoe.sim.runner import make_setup, simulate_one
from hybrimoe.trace.format import RoutingTrace

REFERENCE = Path(__file__).parent / "data" / "sim_batch1_reference.json"
POLICIES = ("hybrimoe", "ktransformers", "llamacpp", "fiddler", "gpu-lru")


def _fingerprint(batch: int | None) -> dict[str, list]:
    """batch None: simulate_one without the argument (its default)."""
    out = {}
    for t in packaged_traces(role="eval"):
        setup = make_setup(RoutingTrace.load(t.path), t.path.name.split(".")[0], t.model, "paper-a6000", t.path)
        for policy in POLICIES:
            kw = {} if batch is None else {"batch": batch}
            r, _ = simulate_one(setup, policy, 0.25, 32, 6, **TUNED, **kw)
            out[f"{setup.name}|{policy}"] = [r.ttft_seconds, r.tbt_seconds, r.hit_rate, r.bytes_copied,
                                             r.bound_tbt_seconds, r.total_seconds, r.prefetch_copies]
    return out


def test_batch_1_is_exactly_the_simulator_before_batching():
    reference = json.loads(REFERENCE.read_text())
    assert len(reference) == 6 * len(POLICIES)
    now = _fingerprint(1)
    assert now == reference  # exact floats: the same arithmetic in the same order
    assert _fingerprint(None) == now  # batch 1 is the default


def test_batched_dense_part_reads_weights_once_and_each_sequences_kv():
    shape = ModelShape.named("mixtral-8x7b")
    model = CostModel.load("paper-a6000")
    costs = ProfileCosts(model, shape)
    for layer in (0, 5):
        for c in (0, 100, 1000):
            assert costs.dense_decode(layer, (c,)) == costs.dense(layer, 1, c)  # batch 1: the same number
    # batch 16 at context 500: weights once + 16 x the one sequence's KV, roofline as gpu_dense_time
    params = shape.attention_params(0) + shape.dense_mlp_params(0) + 2 * shape.hidden
    state = 16 * shape.kv_cache_bytes(0, 501)
    flops = 2.0 * params * 16 + 16 * shape.attention_core_flops(0, 1, 500)
    expected = max((params * model.dense_bits / 8 + state) / model.gpu_hbm_bandwidth,
                   flops / model.gpu_dense_flops) + model.gpu_layer_overhead
    assert costs.dense_decode(0, (500,) * 16) == pytest.approx(expected, rel=1e-12)
    assert costs.dense(0, 1, 500) < costs.dense_decode(0, (500,) * 16) < 16 * costs.dense(0, 1, 500)
    assert costs.lm_head(16) == model.lm_head_time(shape, 16) >= costs.lm_head(1)


def test_a_batched_step_pays_the_batched_dense_part_and_b_rows_of_logits():
    t = packaged_traces("qwen1.5-moe-a2.7b", "eval")[0]
    setup = make_setup(RoutingTrace.load(t.path), t.path.name, t.model, "paper-a6000", t.path)
    r, sim = simulate_one(setup, "ktransformers", 0.25, None, 2, batch=4)
    costs = sim.phase_costs("decode")  # CUDA-graph launch costs: kTransformers' decode
    steps = [f for f in sim.forwards if f.phase == "decode"]
    assert [f.context for f in steps] == [r.prompt_tokens, r.prompt_tokens + 1] and steps[0].tokens == 4
    for f in steps:
        dense = sum(costs.dense_decode(layer, (f.context,) * 4) for layer in range(setup.shape.num_layers))
        assert f.dense_seconds == pytest.approx(dense + costs.lm_head(4), rel=1e-12)
        one_sequence = sum(costs.dense(layer, 4, f.context) for layer in range(setup.shape.num_layers))
        assert f.dense_seconds > one_sequence + costs.lm_head(1)  # not a 4-token prompt's pricing


def test_each_preset_plans_a_batched_decode_step_as_its_system_does():
    """kTransformers (and every preset but those placing by tokens per op) keeps its decode rule at any
    batch; llama.cpp offloads CPU layers' experts only from 32 tokens per op (op offload), in decode too;
    Fiddler's per-expert rule compares costs at the step's token counts."""
    for name in ("ktransformers", "hybrimoe", "gpu-lru", "hybrimoe-cache-only"):
        assert [get_preset(name).scheduler_role(b, False) for b in (1, 4, 16, 64)] == ["decode"] * 4, name
    llama = get_preset("llamacpp")
    assert [llama.scheduler_role(b, False) for b in (1, 16, 31, 32)] == ["decode"] * 3 + ["prefill"]
    assert [llama.scheduler_role(n, True) for n in (16, 32)] == ["decode", "prefill"]
    assert get_preset("llamacpp-no-op-offload").scheduler_role(64, False) == "decode"
    fiddler = get_preset("fiddler")
    assert [fiddler.scheduler_role(b, False) for b in (1, 2)] == ["decode", "prefill"]
    assert get_preset("ktransformers").scheduler_role(2, True) == "prefill"


def test_llamacpp_copies_in_decode_only_from_32_sequences():
    t = packaged_traces("qwen1.5-moe-a2.7b", "eval")[0]
    setup = make_setup(RoutingTrace.load(t.path), t.path.name, t.model, "paper-a6000", t.path)
    copied = {b: simulate_one(setup, "llamacpp", 0.25, None, 2, batch=b)[0].bytes_copied for b in (1, 16, 32)}
    assert copied[1] == copied[16] < copied[32]  # the 55-token prompt's copies (op offload), then none


def test_simulate_cli_batch(capsys):
    from hybrimoe.cli import main

    trace = str(packaged_traces("qwen1.5-moe-a2.7b", "eval")[0].path)
    assert main(["simulate", "--trace", trace, "--policy", "ktransformers,bound", "--max-decode", "3",
                 "--batch", "4", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    for r in rows:
        assert r["batch"] == 4 and r["decode_steps"] == 3
        assert r["decode_tokens_per_second"] == pytest.approx(4 / r["tbt_seconds"])
    assert rows[1]["policy"] == "bound" and rows[1]["tbt_seconds"] <= rows[0]["tbt_seconds"]
    assert main(["simulate", "--trace", trace, "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_bench_batch_only_writes_the_batch_table(tmp_path, capsys):
    from hybrimoe.cli import main

    assert main(["bench", "--quick", "--batch-only", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = doc["rows"]
    assert {r["block"] for r in rows} == {"batch"} and {r["batch"] for r in rows} == {1, 4}
    policies = set(doc["config"]["policies"]) | {"bound"}
    assert {r["policy"] for r in rows} == policies
    for r in rows:  # --quick: 4 steps of the one eval trace; tokens/s = B / TBT; the bound is below
        assert r["decode_steps"] == 4 and r["tokens_per_second"] == pytest.approx(r["batch"] / r["tbt_seconds"])
        assert r["bound_tbt_seconds"] <= r["tbt_seconds"] * (1 + 1e-12)
    kt = {r["batch"]: r["tbt_seconds"] for r in rows if r["policy"] == "ktransformers"}
    for policy in ("hybrimoe", "bound"):  # the summary is kTransformers' TBT / the policy's (one model, ratio)
        for r in rows:
            if r["policy"] == policy:
                got = doc["batch_summary"][policy][str(r["batch"])]["decode_speedup"]
                assert got == pytest.approx(kt[r["batch"]] / r["tbt_seconds"])
    text = (tmp_path / "bench.md").read_text()
    assert text.startswith("### Batched decode (simulated)") and "measured batch 1 only" in text
    assert "| policy | B=1 | B=4 |" in text and text in capsys.readouterr().out


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    REFERENCE.write_text(json.dumps(_fingerprint(1), indent=0) + "\n", encoding="utf-8")
