"""Engine behaviour: stop handling, streaming, sampling reproducibility, context limits, stats.

The first part runs on a fake model that follows the MoETransformer contract (so completions can
be scripted); the second on tiny real checkpoints of every family.
"""

from __future__ import annotations

import pytest
from engine_fakes import FakeConfig, FakeModel, make_tokenizer

from hybrimoe.engine import Engine, PromptError, SamplingParams
from hybrimoe.errors import ConfigError, HybrimoeError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def scripted(tokenizer, completion: str, prompt: str = "hello", **config) -> tuple[Engine, list[int], list[int]]:
    prompt_ids = tokenizer(prompt).input_ids
    script = tokenizer(completion).input_ids
    model = FakeModel(FakeConfig(vocab_size=len(tokenizer), **config), script=script, prompt_len=len(prompt_ids))
    return Engine(model, tokenizer, "fake"), prompt_ids, script


def test_scripted_completion_and_kv_positions(tokenizer) -> None:
    engine, prompt, script = scripted(tokenizer, "the quick brown fox")
    result = engine.generate(prompt, SamplingParams(max_new_tokens=len(script)))
    assert result.token_ids == script and result.text == "the quick brown fox"
    assert result.finish_reason == "length" and result.completion_tokens == len(script)
    # one prefill over the prompt, then one token per step at the next position
    assert engine.model.calls == [(0, len(prompt))] + [(len(prompt) + i, 1) for i in range(len(script) - 1)]


def test_eos_and_user_stop_ids_end_generation_and_are_not_returned(tokenizer) -> None:
    engine, prompt, script = scripted(tokenizer, "the quick</s> brown fox")
    eos = tokenizer.eos_token_id
    result = engine.generate(prompt, SamplingParams(max_new_tokens=20))
    cut = script.index(eos)
    assert result.token_ids == script[:cut] and result.finish_reason == "stop"
    assert result.completion_tokens == cut + 1 and result.text == "the quick"
    user = engine.generate(prompt, SamplingParams(max_new_tokens=20, stop_token_ids=[script[1]]))
    assert user.token_ids == script[:1] and user.finish_reason == "stop"


def test_stop_string_ends_generation_and_is_not_returned(tokenizer) -> None:
    engine, prompt, script = scripted(tokenizer, "hello world STOP here and more words")
    result = engine.generate(prompt, SamplingParams(max_new_tokens=30, stop_strings=["STOP"]))
    assert result.text == "hello world " and result.finish_reason == "stop"
    assert tokenizer.decode(result.token_ids).startswith("hello world STOP")
    assert len(result.token_ids) < len(script)
    chunks = list(engine.stream(prompt, SamplingParams(max_new_tokens=30, stop_strings=["STOP"])))
    assert "".join(c.text for c in chunks) == "hello world "
    assert all("S" not in c.text for c in chunks)  # the start of the stop string was never shown


def test_stream_chunks_concatenate_to_generate_and_to_decode(tokenizer) -> None:
    engine, prompt, script = scripted(tokenizer, "café naïve — 東京 ✓ 🙂 done")
    params = SamplingParams(max_new_tokens=len(script), stop_strings=["never"])
    chunks = list(engine.stream(prompt, params))
    assert all(c.finish_reason is None and c.result is None for c in chunks[:-1])
    last = chunks[-1].result
    assert chunks[-1].finish_reason == "length" and last is not None
    assert [t for c in chunks for t in c.token_ids] == last.token_ids == script
    assert "".join(c.text for c in chunks) == last.text == tokenizer.decode(script) == "café naïve — 東京 ✓ 🙂 done"
    assert all("\ufffd" not in c.text for c in chunks)
    assert engine.generate(prompt, params).text == last.text


def test_seeded_sampling_is_reproducible_and_seed_dependent(tokenizer) -> None:
    engine = Engine(FakeModel(FakeConfig(vocab_size=len(tokenizer))), tokenizer, "fake")
    prompt = engine.encode("hello world")
    run = lambda seed, **kw: engine.generate(prompt, SamplingParams(max_new_tokens=12, temperature=1.0,
                                                                    seed=seed, **kw)).token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = engine.generate(prompt, SamplingParams(max_new_tokens=12)).token_ids
    assert run(5, top_k=1) == greedy and run(6, top_p=1e-6) == greedy
    assert run(1) != greedy


def test_context_limit(tokenizer) -> None:
    engine, prompt, script = scripted(tokenizer, "the quick brown fox jumps over the lazy dog", max_position_embeddings=10)
    result = engine.generate(prompt, SamplingParams(max_new_tokens=50))
    assert result.finish_reason == "length" and len(prompt) + result.completion_tokens == 10
    with pytest.raises(HybrimoeError, match="at most 9 prompt tokens"):
        engine.generate(list(range(10)), SamplingParams())
    with pytest.raises(ValueError):  # PromptError is also a ValueError
        engine.generate([], SamplingParams())
    with pytest.raises(ConfigError):
        engine.generate(prompt, SamplingParams(top_p=2.0))


def test_max_context_runtime_option(tokenizer) -> None:
    engine = Engine(FakeModel(FakeConfig(vocab_size=len(tokenizer))), tokenizer, "fake")
    from hybrimoe.engine import EngineOptions
    small = Engine(engine.model, tokenizer, "fake", EngineOptions.from_kwargs(max_context=8))
    assert engine.max_context == 64 and small.max_context == 8
    with pytest.raises(ConfigError, match="unknown runtime option"):
        EngineOptions.from_kwargs(expert_cahce=3)
    with pytest.raises(ConfigError, match="torch device name"):
        EngineOptions.from_kwargs(device="gpu0")
    with pytest.raises(ConfigError, match="max_context"):
        EngineOptions.from_kwargs(max_context=1)


def test_stats_are_cumulative(tokenizer) -> None:
    engine, prompt, script = scripted(tokenizer, "the quick brown fox")
    for _ in range(2):
        engine.generate(prompt, SamplingParams(max_new_tokens=3))
    stats = engine.stats()
    assert stats["requests"] == 2 and stats["prompt_tokens"] == 2 * len(prompt)
    assert stats["completion_tokens"] == 6 and stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0


def test_encode_chat_uses_the_template_or_a_plain_join(tokenizer) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    engine = Engine(FakeModel(FakeConfig(vocab_size=len(tokenizer))), tokenizer, "fake")
    assert tokenizer.decode(engine.encode_chat(messages)) == "<|user|>hi there\n<|assistant|>"
    plain = Engine(engine.model, make_tokenizer(chat_template=False), "fake")
    assert plain.tokenizer.decode(plain.encode_chat(messages)) == "user: hi there\nassistant:"
    with pytest.raises(HybrimoeError):
        engine.encode_chat([{"role": "user"}])


def test_a_chat_the_template_refuses_is_a_prompt_error(tokenizer) -> None:
    strict = make_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('system messages are not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    engine = Engine(FakeModel(FakeConfig(vocab_size=len(strict))), strict, "fake")
    with pytest.raises(PromptError, match="system messages are not supported"):
        engine.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert strict.decode(engine.encode_chat([{"role": "user", "content": "hi"}])) == "hi"


def test_stream_checks_its_input_before_the_first_chunk(tokenizer) -> None:
    engine = Engine(FakeModel(FakeConfig(vocab_size=len(tokenizer))), tokenizer, "fake")
    with pytest.raises(ConfigError):
        engine.stream([1, 2], SamplingParams(max_new_tokens=0))
    with pytest.raises(HybrimoeError):
        engine.stream([len(tokenizer) + 5], SamplingParams())
    assert engine.model.calls == []


def test_generation_config_eos_ids_are_read_and_a_bad_file_is_a_checkpoint_error(tokenizer, tmp_path) -> None:
    from hybrimoe.errors import CheckpointError

    model = FakeModel(FakeConfig(vocab_size=len(tokenizer), eos_token_ids=(9,)))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 7]}')
    engine = Engine(model, tokenizer, "fake", model_dir=tmp_path)
    assert engine.eos_token_ids == {5, 7, 9, tokenizer.eos_token_id}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, ')
    with pytest.raises(CheckpointError, match="generation_config.json"):
        Engine(model, tokenizer, "fake", model_dir=tmp_path)
