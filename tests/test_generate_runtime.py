"""`hybrimoe generate` with the hybrid runtime: every placement preset gives the plain engine's greedy
tokens, and `--json` reports the cache counters and busy seconds of cpu, gpu and copy link."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrimoe.cli import main

PROMPT = "the quick brown fox jumps"


def generate_json(capsys, model: Path, *flags: str, prompt: str = PROMPT) -> dict:
    """`hybrimoe generate --json` greedy, 12 tokens, fp32: its JSON output (the command must succeed)."""
    capsys.readouterr()
    code = main(["generate", "--model", str(model), "--prompt", prompt, "--dtype", "fp32", "--json",
                 "--temperature", "0", "--max-new-tokens", "12", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("family", ["qwen2-moe", "deepseek-v3"])
@pytest.mark.parametrize("policy", ["resident", "ktransformers", "llamacpp", "gpu-lru", "fiddler", "hybrimoe"])
def test_every_policy_gives_the_plain_tokens(tiny_checkpoint, capsys, family: str, policy: str) -> None:
    model = tiny_checkpoint(family)
    plain = generate_json(capsys, model)
    assert "runtime" not in plain
    hybrid = generate_json(capsys, model, "--policy", policy, "--cache-ratio", "0.25")
    assert hybrid["token_ids"] == plain["token_ids"]
    runtime = hybrid["runtime"]
    assert runtime["policy"] == policy
    cache = runtime["cache"]
    assert cache["resident"] <= cache["slots"]
    assert set(runtime["busy_seconds"]) == {"cpu", "gpu", "copy"}
    assert sum(runtime["busy_seconds"].values()) > 0


def test_impossible_budget_is_a_clear_error(tiny_checkpoint, capsys) -> None:
    model = tiny_checkpoint("mixtral")
    capsys.readouterr()
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--gpu-memory", "1KB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "dense" in err and "Traceback" not in err
