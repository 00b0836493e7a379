"""`hybrimoe simulate` and `hybrimoe bench` from the command line."""

import json

import pytest

from hybrimoe.cli import main
from hybrimoe.data import packaged_traces


def _trace() -> str:
    return str(packaged_traces("qwen1.5-moe-a2.7b", "eval")[0].path)


def test_simulate_json_has_one_line_per_policy_and_ratio(capsys, tmp_path):
    png = tmp_path / "timeline.png"
    code = main(["simulate", "--trace", _trace(), "--policy", "hybrimoe,ktransformers", "--cache-ratio", "0.25,0.5",
                 "--prompt-tokens", "16", "--max-decode", "3", "--predictor-accuracy", "0.9", "--json",
                 "--plot", str(png)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["policy"], r["cache_ratio"]) for r in rows] == [
        ("hybrimoe", 0.25), ("hybrimoe", 0.5), ("ktransformers", 0.25), ("ktransformers", 0.5)]
    for r in rows:
        assert r["ttft_seconds"] > 0 and r["tbt_seconds"] > 0 and 0 <= r["hit_rate"] <= 1
        assert r["prompt_tokens"] == 16 and r["decode_steps"] == 3 and r["profile"] == "paper-a6000"
    assert rows[0]["predictor"] == "truth-with-noise(0.9)"
    assert png.stat().st_size > 1000


def test_simulate_rejects_unknown_policy(capsys):
    assert main(["simulate", "--trace", _trace(), "--policy", "magic"]) == 2
    assert "hybrimoe" in capsys.readouterr().err  # the error lists the known presets


def test_bench_quick_writes_table_json_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["simulated"] and doc["profile"] == "paper-a6000"
    assert {"main", "ablation", "cache", "prefetch"} <= {r["block"] for r in doc["rows"]}
    # docs/BENCH.md: the summary is the arithmetic mean, over models, cache ratios (and prompt lengths),
    # of kTransformers' time / the policy's time; recompute it from the rows
    main_rows = [r for r in doc["rows"] if r["block"] == "main"]
    for phase, key, summary_key in (("prefill", "ttft_seconds", "prefill_speedup"),
                                    ("decode", "tbt_seconds", "decode_speedup")):
        def time_of(policy, r):
            return next(x[key] for x in main_rows if x["phase"] == phase and x["policy"] == policy and
                        (x["model"], x["cache_ratio"], x.get("prompt_tokens")) ==
                        (r["model"], r["cache_ratio"], r.get("prompt_tokens")))
        for policy in ("hybrimoe", "llamacpp", "gpu-lru", "fiddler"):
            mine = [r for r in main_rows if r["phase"] == phase and r["policy"] == policy]
            expected = sum(time_of("ktransformers", r) / r[key] for r in mine) / len(mine)
            assert doc["summary"][policy][summary_key] == pytest.approx(expected)
    decode = next(r for r in main_rows if r["phase"] == "decode" and r["policy"] == "hybrimoe")
    assert decode["decode_steps"] == 6  # --quick: 6 decode steps of the one eval trace
    for name in ("speedup_prefill.png", "speedup_decode.png", "hit_rates.png", "timeline_hybrimoe.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "Mean speedup over kTransformers" in capsys.readouterr().out


def test_simulate_with_learned_predictor_and_per_layer_budgets(capsys):
    code = main(["simulate", "--trace", _trace(), "--policy", "hybrimoe", "--max-decode", "3",
                 "--predictor", "cross-layer", "--per-layer-cache", "--json"])
    assert code == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["predictor"] == "cross-layer-stats" and row["decode_steps"] == 3
