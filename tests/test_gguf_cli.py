"""`hybrimoe generate --model x.gguf`: the tokenizer and chat template come from the file, and the
command gives the safetensors original's greedy tokens and text (plain engine and hybrid runtime).
Every family's model-level parity is in test_gguf_parity.py; here one family per tokenizer / attention
kind keeps the CLI runs few."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from gguf_fixtures import tiny_gguf  # noqa: F401  (fixture)
from hybrimoe.engine import Engine
from hybrimoe.gguf.files import open_gguf
from hybrimoe.gguf.tokenizer import byte_level_tokenizer
from test_generate_runtime import generate_json as generate_cli_json

PROMPT = "Hello, world. What is the capital of France?"
TEXTS = [PROMPT, "  two spaces\n\nnew lines\ttab 0123456789", "<|im_start|>user\nhi<|im_end|>\n", "ünïcödé 漢字 😀"]


def generate_json(capsys, model: Path, *flags: str) -> dict:
    return generate_cli_json(capsys, model, *flags, prompt=PROMPT)


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "olmoe", "deepseek-v2-lite"])
def test_generate_on_a_gguf_file_gives_the_originals_tokens_and_text(tiny_gguf, capsys, family: str) -> None:
    t = tiny_gguf(family)
    want = generate_json(capsys, t.hf_dir)
    got = generate_json(capsys, t.path)
    assert got["model"] == f"tiny-{family}"
    for key in ("token_ids", "text", "prompt_tokens", "finish_reason"):
        assert got[key] == want[key], key


def test_generate_with_the_hybrid_runtime_on_a_gguf_file(tiny_gguf, capsys) -> None:
    t = tiny_gguf("deepseek-v3", split_max_tensors=7)
    plain = generate_json(capsys, t.hf_dir)
    hybrid = generate_json(capsys, t.path.parent, "--policy", "hybrimoe", "--cache-ratio", "0.25")
    assert hybrid["token_ids"] == plain["token_ids"] and hybrid["runtime"]["policy"] == "hybrimoe"


@pytest.mark.parametrize("family", ["mixtral", "deepseek-v2-lite", "olmoe"])
def test_tokenizer_eos_and_chat_template_come_from_the_file(tiny_gguf, family: str) -> None:
    t = tiny_gguf(family)
    ours, original = Engine.from_pretrained(t.path), Engine.from_pretrained(t.hf_dir)
    for text in TEXTS:
        assert ours.encode(text) == original.encode(text), text
        ids = ours.encode(text)
        assert ours.tokenizer.decode(ids) == original.tokenizer.decode(ids)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ours.tokenizer.chat_template == original.tokenizer.chat_template
    assert ours.encode_chat(chat) == original.encode_chat(chat)
    assert ours.eos_token_ids == original.eos_token_ids       # <|endoftext|> and <|im_end|>


@pytest.mark.parametrize("family", ["deepseek-v3", "olmoe"])
def test_byte_level_fallback_tokenizer_encodes_like_the_original(tiny_gguf, family: str) -> None:
    """What transformers versions that refuse deepseek2 / olmoe GGUF tokenizers (5.17) get instead."""
    t = tiny_gguf(family)
    ours, original = byte_level_tokenizer(open_gguf(t.path).metadata), AutoTokenizer.from_pretrained(t.hf_dir)
    for text in TEXTS:
        assert ours(text).input_ids == original(text).input_ids, text
    assert ours.eos_token == original.eos_token and len(ours) == len(original)
