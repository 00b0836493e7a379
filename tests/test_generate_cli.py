"""`hybrimoe generate` on tiny checkpoints of every family: same greedy tokens as transformers,
reproducible sampling, stop strings and ids, streaming, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrimoe.cli import main
from hybrimoe.tiny import FAMILIES

PROMPT = "the quick brown fox"


def generate_json(capsys, model: Path, *flags: str) -> dict:
    capsys.readouterr()
    code = main(["generate", "--model", str(model), "--prompt", PROMPT, "--dtype", "fp32", "--json", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def reference_greedy(model: Path, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy tokens, cut before the first EOS (ours does not return it)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n)[0, len(prompt_ids):].tolist()
    eos = hf.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(tiny_checkpoint, capsys, family: str) -> None:
    from transformers import AutoTokenizer

    model = tiny_checkpoint(family)
    result = generate_json(capsys, model, "--temperature", "0", "--max-new-tokens", "16")
    prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    expected = reference_greedy(model, prompt_ids, 16)
    assert result["token_ids"] == expected
    assert result["prompt_tokens"] == len(prompt_ids)
    assert result["finish_reason"] == ("length" if len(expected) == 16 else "stop")
    assert result["completion_tokens"] == min(16, len(expected) + 1)
    assert result["prefill_seconds"] > 0 and result["decode_tokens_per_second"] > 0
    assert isinstance(result["text"], str)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mixtral")


def test_sampling_is_seeded_and_top_k_1_is_greedy(model_dir, capsys) -> None:
    sample = lambda seed, *extra: generate_json(capsys, model_dir, "--temperature", "1.0", "--seed", str(seed),
                                                "--max-new-tokens", "12", *extra)["token_ids"]
    greedy = generate_json(capsys, model_dir, "--max-new-tokens", "12")["token_ids"]
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, "--top-k", "1") == greedy


def test_stop_string_and_stop_id_end_generation_unreturned(model_dir, capsys) -> None:
    full = generate_json(capsys, model_dir, "--max-new-tokens", "16")
    ids, text = full["token_ids"], full["text"]
    assert len(ids) >= 8 and len(text) >= 6, full
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = generate_json(capsys, model_dir, "--max-new-tokens", "16", "--stop", stop, "--stop", "\x00never")
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    token = ids[5]
    by_id = generate_json(capsys, model_dir, "--max-new-tokens", "16", "--stop-token-id", str(token))
    assert by_id["token_ids"] == ids[:ids.index(token)] and by_id["finish_reason"] == "stop"
    assert by_id["completion_tokens"] == ids.index(token) + 1


def test_streamed_stdout_equals_json_text(model_dir, capsys) -> None:
    text = generate_json(capsys, model_dir, "--max-new-tokens", "16")["text"]
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--dtype", "fp32",
                 "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_chat_flag_uses_the_chat_template(model_dir, capsys) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template, "tiny checkpoints ship a chat template"
    result = generate_json(capsys, model_dir, "--chat", "--max-new-tokens", "2")
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    assert result["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)


def test_user_errors_exit_2_without_traceback(model_dir, capsys, tmp_path) -> None:
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-context", "3"]) == 2
    assert "prompt has" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_python_dash_m_entry_point(model_dir) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "hybrimoe", "generate", "--model", str(model_dir), "--prompt",
                           PROMPT, "--max-new-tokens", "4", "--dtype", "fp32", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["completion_tokens"] <= 4 and result["prompt_tokens"] > 0


def test_a_closed_stdout_ends_quietly(monkeypatch, capsys) -> None:
    def reader_left(args) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("hybrimoe.cli.generate.run", reader_left)  # read when main() builds the parser
    assert main(["generate", "--model", "unused", "--prompt", "x"]) == 1
    assert capsys.readouterr().err == ""
