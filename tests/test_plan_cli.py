"""`hybrimoe plan` end to end: JSON rows, the recommendation, and the recommended `serve` command run on
a tiny checkpoint (the serve path up to the HTTP server: its parser, `engine_from_args`, a few tokens),
which must start and stay within the memory the plan stated."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from hybrimoe.cli import build_parser, main
from hybrimoe.cli.generate import engine_from_args
from hybrimoe.engine import SamplingParams
from hybrimoe.moe.quant import ExpertFormat
from hybrimoe.plan.memory import Machine, format_memory
from hybrimoe.plan.target import resolve_target

REQUIRED = ("policy", "cache_ratio", "cache_bytes", "expert_dtype", "ttft_seconds", "decode_tokens_per_second",
            "gpu_bytes", "host_bytes", "fits", "recommended", "synthetic", "routing", "profile")


def plan_rows(capsys, argv: list[str]) -> list[dict]:
    assert main(["plan", "--json", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def tiny_gpu_bytes(path, experts: int, fmt: str = "bf16") -> int:
    """GPU memory for the dense part, KV at 32 tokens, transient + 4 staging buffers and `experts`
    experts of format `fmt` (more of a smaller format), with no reserve."""
    target = resolve_target(str(path))
    mem = format_memory(target, ExpertFormat.parse(fmt, torch.bfloat16), Machine(0, 0, 32, 0, "cpu"))
    return mem.dense_bytes + mem.kv_bytes + (2 + 4 + experts) * mem.expert_bytes


@pytest.mark.parametrize("family,policy,fmt,extra", [
    ("mixtral", "hybrimoe", "bf16", []), ("deepseek-v2-lite", "hybrimoe", "int4", []),
    ("qwen2-moe", "ktransformers", "int8", []), ("qwen3-moe", "llamacpp", "bf16", []),
    ("olmoe", None, "bf16,int8,int4", []), ("deepseek-v3", "hybrimoe", "int8", ["--staging-slots", "0"]),
    ("deepseek-v2", "hybrimoe", "bf16", ["--staging-slots", "2"]),
    ("mixtral", "hybrimoe", "int4", ["--cpu-kernel", "onnxruntime"])])
def test_recommended_command_runs_within_the_stated_memory(tiny_checkpoint, capsys, family, policy, fmt, extra):
    """The command of the largest cache that fits (every fitting row has one; the recommended row's is
    the plan's recommendation) starts the runtime, which allocates exactly the planned cache and store."""
    path = tiny_checkpoint(family, experts=8)
    gpu = tiny_gpu_bytes(path, 6, fmt.split(",")[0])
    argv = ["--model", str(path), "--gpu-memory", str(gpu), "--host-memory", "1GB", "--gpu-reserve", "0",
            "--device", "cpu", "--context", "32", "--prompt-tokens", "8", "--decode-tokens", "4",
            "--expert-dtype", fmt, *extra]
    rows = plan_rows(capsys, argv + (["--policy", policy] if policy else []))
    recommended = [r for r in rows if r["recommended"]]
    assert len(recommended) == 1 and recommended[0]["fits"] and recommended[0]["synthetic"]  # no tiny trace: labelled
    assert all((r["command"] is not None) == r["fits"] for r in rows)
    if policy is None:  # the plan's own choice
        rec = recommended[0]
    else:  # the largest cache of that policy, the tightest fit
        rec = max((r for r in rows if r["fits"] and r["policy"] == policy and r["cache"] == "largest"),
                  key=lambda r: r["cache_slots"])
        assert 0 < rec["cache_slots"] < rec["store_bytes"] // rec["expert_bytes"]  # a partial cache, as planned
    argv = shlex.split(rec["command"])
    assert argv[:2] == ["hybrimoe", "serve"]
    args = build_parser().parse_args(argv[1:])  # every flag exists in `serve`
    engine = engine_from_args(args)  # what `serve` does before it starts the HTTP server
    try:
        result = engine.generate([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=4))
        assert result.completion_tokens >= 1
        runtime, model = engine.runtime, engine.model
        cache = runtime.cache
        eb = model.expert_store.expert_nbytes
        assert eb == rec["expert_bytes"] and runtime.preset.name == rec["policy"]
        pool = cache.pool.numel() * cache.pool.element_size()
        if rec["policy"] == "llamacpp":  # whole layers of the budget
            assert pool <= rec["cache_bytes"] and pool % (8 * eb) == 0
        else:
            assert pool == rec["cache_bytes"] and cache.num_slots == rec["cache_slots"]
        assert cache.staging_slots == rec["staging_slots"] and len(cache._prefetch_buffers) <= rec["staging_slots"]
        assert model.expert_store.nbytes == rec["host_bytes"] == rec["store_bytes"]
        kernel = "onnxruntime" if "onnxruntime" in extra else "torch"
        assert model.expert_store.cpu_kernel == rec["cpu_kernel"] == kernel
        assert (rec["cpu_kernel_copy_bytes"] > 0) == (kernel == "onnxruntime")
        dense = sum(p.numel() * p.element_size() for p in model.parameters()) + \
            sum(b.numel() * b.element_size() for b in model.buffers())
        assert dense == rec["dense_bytes"]
        # everything the runtime can hold on the device at once, at most what the plan stated
        held = dense + pool + (rec["staging_slots"] + 2) * eb + rec["kv_bytes"]
        assert held <= rec["gpu_bytes"] <= gpu
    finally:
        engine.close()


def test_json_rows_and_the_recommendation(capsys):
    rows = plan_rows(capsys, ["--model", "mixtral-8x7b", "--gpu-memory", "24GB", "--host-memory", "64GB",
                              "--profile", "paper-a6000", "--prompt-tokens", "32", "--decode-tokens", "4",
                              "--policy", "hybrimoe,ktransformers,llamacpp,resident"])
    for row in rows:
        assert all(k in row for k in REQUIRED), row
        assert row["simulated"] and row["profile"] == "paper-a6000" and not row["synthetic"]
        assert ("eval trace" in row["routing"]) and row["fits"] == (row["decode_tokens_per_second"] is not None)
        if row["fits"]:
            assert row["gpu_bytes"] <= 24 * 10**9 and row["host_bytes"] <= 64 * 10**9
    fitting = [r for r in rows if r["fits"]]
    rec = [r for r in rows if r["recommended"]]
    assert len(rec) == 1 and rec[0]["command"].startswith("hybrimoe serve --model ./mixtral-8x7b --device cuda")
    assert rec[0]["decode_tokens_per_second"] == max(r["decode_tokens_per_second"] for r in fitting)
    assert not any(r["fits"] for r in rows if r["expert_dtype"] == "bf16")  # 90 GB of experts > 64 GB
    assert {r["cache"] for r in fitting} == {"largest", "1/2", "1/4"}
    build_parser().parse_args(shlex.split(rec[0]["command"])[1:])


def test_refusal_exits_2_with_one_line(capsys):
    code = main(["plan", "--model", "qwen2-57b-a14b", "--gpu-memory", "12GB", "--host-memory", "128GB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "does not fit this machine with any policy or expert format" in err[0] and "more than 12.0 GB" in err[0]


def test_unsupported_family_gets_a_plan_without_command(capsys):
    rows = plan_rows(capsys, ["--model", "qwen3.6-35b-a3b", "--gpu-memory", "24GB", "--host-memory", "64GB",
                              "--prompt-tokens", "16", "--decode-tokens", "2", "--policy", "ktransformers",
                              "--expert-dtype", "int4"])
    rec = [r for r in rows if r["recommended"]]
    assert len(rec) == 1 and rec[0]["command"] is None and rec[0]["memory_estimated"]


def test_plot_and_calibrate(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("olmoe")
    png = tmp_path / "plan.png"
    rows = plan_rows(capsys, ["--model", str(path), "--gpu-memory", str(tiny_gpu_bytes(path, 6)), "--host-memory",
                              "1GB", "--gpu-reserve", "0", "--device", "cpu", "--context", "32", "--prompt-tokens",
                              "8", "--decode-tokens", "2", "--calibrate", "--expert-dtype", "int8",
                              "--policy", "hybrimoe,ktransformers", "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rows and all(r["profile"].startswith("measured here by --calibrate") for r in rows)
    assert any(r["recommended"] for r in rows)


@pytest.mark.parametrize("argv,message", [
    (["--model", "no-such-model", "--gpu-memory", "24GB"], "not a shipped shape"),
    (["--model", "mixtral-8x7b", "--gpu-memory", "lots"], "--gpu-memory must be a size"),
    (["--model", "mixtral-8x7b", "--gpu-memory", "24GB", "--expert-dtype", "int3"], "formats are"),
    (["--model", "mixtral-8x7b", "--gpu-memory", "24GB", "--policy", "nope"], "unknown policy"),
    (["--model", "mixtral-8x7b", "--gpu-memory", "24GB", "--context", "100"], "must exceed --prompt-tokens"),
    (["--model", "mixtral-8x7b"], "no CUDA device here"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    if "--gpu-memory" not in argv and torch.cuda.is_available():
        pytest.skip("this machine's GPU gives the default --gpu-memory")
    assert main(["plan", "--host-memory", "64GB", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_recorded_trace_is_used_and_checked(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint("qwen3-moe")
    trace = tmp_path / "routing.jsonl.gz"
    assert main(["generate", "--model", str(path), "--prompt", "Hello world", "--max-new-tokens", "6",
                 "--record-trace", str(trace), "--json"]) == 0
    capsys.readouterr()
    rows = plan_rows(capsys, ["--model", str(path), "--gpu-memory", str(tiny_gpu_bytes(path, 6)), "--host-memory",
                              "1GB", "--gpu-reserve", "0", "--device", "cpu", "--context", "32", "--prompt-tokens",
                              "8", "--decode-tokens", "4", "--trace", str(trace), "--policy", "hybrimoe"])
    assert rows and all(not r["synthetic"] and r["routing"] == "recorded trace routing.jsonl.gz" for r in rows)
    other = tiny_checkpoint("deepseek-v2-lite")
    assert main(["plan", "--model", str(other), "--gpu-memory", "1GB", "--host-memory", "1GB", "--device", "cpu",
                 "--gpu-reserve", "0",
                 "--context", "32", "--prompt-tokens", "8", "--trace", str(trace)]) == 2
    assert "was recorded from" in capsys.readouterr().err
