"""BatchEngine bookkeeping on the scripted fake model: chunks equal Engine.stream's, request checks,
slots, joining and leaving, chunked prefill, cancel, failures, the KV size estimate.

Token parity of real models (every family, the hybrid policies) is in tests/test_batch_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from engine_fakes import FakeConfig, FakeModel, make_tokenizer

from hybrimoe.engine import Engine, SamplingParams
from hybrimoe.engine.batch import BatchEngine, BatchEvent
from hybrimoe.errors import ConfigError, HybrimoeError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def chunk_key(chunk) -> tuple:
    """A chunk without its timings (seconds differ between runs)."""
    r = chunk.result
    result = None if r is None else (r.text, r.token_ids, r.prompt_tokens, r.completion_tokens, r.finish_reason)
    return tuple(chunk.token_ids), chunk.text, chunk.finish_reason, result


def run_batch(batch: BatchEngine, requests: list[tuple[list[int], SamplingParams]],
              join_at: list[int] | None = None) -> dict[int, list[tuple]]:
    """Submits request i before step join_at[i] (default: all at once); steps until no work is left.
    Returns {request index: chunk keys in order}."""
    join_at = join_at or [0] * len(requests)
    ids: dict[int, int] = {}
    out: dict[int, list[tuple]] = {i: [] for i in range(len(requests))}
    step = 0
    while step <= max(join_at) or batch.has_work():
        for i, (prompt, params) in enumerate(requests):
            if join_at[i] == step:
                ids[batch.submit(prompt, params)] = i
        for event in batch.step():
            assert event.error is None, event.error
            out[ids[event.request_id]].append(chunk_key(event.chunk))
        step += 1
        assert step < 500
    return out


def solo(engine: Engine, prompt: list[int], params: SamplingParams) -> list[tuple]:
    return [chunk_key(c) for c in engine.stream(prompt, params)]


def fake_engine(tokenizer) -> Engine:
    return Engine(FakeModel(FakeConfig(vocab_size=len(tokenizer), max_position_embeddings=64)), tokenizer, "fake")


def mixed_requests(tokenizer) -> list[tuple[list[int], SamplingParams]]:
    enc = lambda s: tokenizer(s).input_ids
    return [
        (enc("hello"), SamplingParams(max_new_tokens=9)),
        (enc("the quick brown fox jumps over"), SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)),
        (enc("café"), SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, seed=11,
                                     stop_strings=["ve", "zz"])),
        (enc("numbers 0123"), SamplingParams(max_new_tokens=7, frequency_penalty=1.5, presence_penalty=0.5,
                                             logit_bias={5: 3.0})),
        (enc("STOP here"), SamplingParams(max_new_tokens=6, temperature=1.2, top_p=0.9, seed=5,
                                          stop_token_ids=[169, 9])),
        (enc("a"), SamplingParams(max_new_tokens=100)),  # runs into the context limit
    ]


@pytest.mark.parametrize("max_batch,prefill_chunk", [(1, 256), (3, 4), (8, 2), (8, 256)])
def test_every_request_streams_exactly_its_solo_chunks(tokenizer, max_batch: int, prefill_chunk: int) -> None:
    engine = fake_engine(tokenizer)
    requests = mixed_requests(tokenizer)
    expected = {i: solo(engine, p, s) for i, (p, s) in enumerate(requests)}
    # the requests end by length, context limit, stop string and stop id, after different numbers of tokens
    assert [len(expected[i]) for i in (2, 4, 5)] == [6, 4, 64 - len(requests[5][0])]
    assert [expected[i][-1][2] for i in range(6)] == ["length"] * 2 + ["stop", "length", "stop", "length"]
    batch = BatchEngine(engine, max_batch=max_batch, prefill_chunk=prefill_chunk)
    got = run_batch(batch, requests, join_at=[0, 0, 2, 3, 3, 7])
    assert got == expected
    assert not batch.has_work() and batch.running == batch.waiting == 0


def test_slots_waiting_and_prefill_chunks(tokenizer) -> None:
    engine = fake_engine(tokenizer)
    batch = BatchEngine(engine, max_batch=2, prefill_chunk=3)
    long_prompt = list(range(10, 18))  # 8 tokens: three steps of at most 3
    a = batch.submit(long_prompt, SamplingParams(max_new_tokens=2))
    b = batch.submit([5, 6], SamplingParams(max_new_tokens=4))
    c = batch.submit([7], SamplingParams(max_new_tokens=1))
    assert (batch.running, batch.waiting) == (0, 3) and batch.has_work()
    engine.model.calls.clear()
    assert batch.step() == []  # a takes the whole chunk budget; b waits for prefill room
    assert (batch.running, batch.waiting) == (2, 1)
    assert engine.model.calls == [(0, 3)]
    assert batch.step() == []
    events = batch.step()  # a's last 2 prompt tokens + b's first prompt token... b needs 2: one fits
    assert [e.request_id for e in events] == [a]
    assert engine.model.calls[2:] == [(6, 2), (0, 1)]
    events = batch.step()  # a decodes its last token and leaves; b's prompt ends
    assert [(e.request_id, e.chunk.finish_reason) for e in events] == [(a, "length"), (b, None)]
    assert (batch.running, batch.waiting) == (1, 1)
    events = batch.step()  # c joins the freed slot
    assert [e.request_id for e in events] == [b, c] and batch.running == 1


def test_cancel_frees_the_slot_and_ends_the_events(tokenizer) -> None:
    engine = fake_engine(tokenizer)
    batch = BatchEngine(engine, max_batch=2)
    a = batch.submit([1, 2, 3], SamplingParams(max_new_tokens=30))
    b = batch.submit([4, 5], SamplingParams(max_new_tokens=30))
    c = batch.submit([6], SamplingParams(max_new_tokens=3))
    d = batch.submit([7], SamplingParams(max_new_tokens=3))
    batch.step()
    batch.cancel(a)
    batch.cancel(d)  # still waiting
    batch.cancel(12345)  # unknown: ignored
    events = batch.step()
    assert {e.request_id for e in events} == {b, c} and batch.running == 2 and batch.waiting == 0
    batch.cancel(b)
    while batch.has_work():
        assert all(e.request_id == c for e in batch.step())
    assert engine.stats()["requests"] == 1  # only c finished


def test_submit_checks_like_stream_before_anything_runs(tokenizer) -> None:
    engine = fake_engine(tokenizer)
    batch = BatchEngine(engine, max_batch=2)
    for prompt, params, error in [([1, 2], SamplingParams(max_new_tokens=0), ConfigError),
                                  ([], SamplingParams(), HybrimoeError),
                                  ([len(tokenizer) + 5], SamplingParams(), HybrimoeError),
                                  (list(range(64)), SamplingParams(), HybrimoeError),
                                  ([1], SamplingParams(logit_bias={10**6: 1.0}), HybrimoeError)]:
        with pytest.raises(error) as from_stream:
            engine.stream(prompt, params)
        with pytest.raises(error) as from_submit:
            batch.submit(prompt, params)
        assert str(from_submit.value) == str(from_stream.value)
    assert not batch.has_work() and engine.model.calls == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="max_batch"):
            BatchEngine(engine, max_batch=bad)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        BatchEngine(engine, max_batch=1, prefill_chunk=0)


def test_a_failing_sequence_ends_alone_with_its_error(tokenizer) -> None:
    engine = fake_engine(tokenizer)
    batch = BatchEngine(engine, max_batch=4)
    good = batch.submit([1, 2], SamplingParams(max_new_tokens=3))
    bad = batch.submit([3, 4], SamplingParams(max_new_tokens=3, logit_bias={9: 1.0}))
    forward = engine.model.forward

    def nan_for_bad(input_ids: torch.Tensor, start_pos: int, kv) -> torch.Tensor:
        logits = forward(input_ids, start_pos, kv)
        return logits.fill_(float("nan")) if input_ids[0] == 3 else logits
    engine.model.forward = nan_for_bad
    events = batch.step()
    by_id = {e.request_id: e for e in events}
    assert by_id[good].error is None and by_id[good].chunk.token_ids
    assert isinstance(by_id[bad].error, HybrimoeError) and "non-finite" in str(by_id[bad].error)
    assert batch.running == 1
    engine.model.forward = forward
    while batch.has_work():
        assert all(e.request_id == good and e.error is None for e in batch.step())


def test_kv_bytes_is_what_full_sequences_occupy(tiny_checkpoint) -> None:
    for family in ("mixtral", "deepseek-v2-lite"):
        engine = Engine.from_pretrained(tiny_checkpoint(family), dtype="fp32", max_context=40)
        seq_kv = engine.model.new_kv_cache(engine.max_context)
        engine.model(torch.tensor([1, 2, 3]), 0, seq_kv)
        assert seq_kv.nbytes() > 0
        assert BatchEngine.kv_bytes(engine, 3) == 3 * seq_kv.nbytes()
        assert BatchEvent(1, None).error is None  # the error field is optional


def test_a_replayed_trace_cannot_drive_a_batch(tokenizer) -> None:
    from types import SimpleNamespace

    engine = fake_engine(tokenizer)
    engine.runtime = SimpleNamespace(replay=object())  # --replay-trace: one sequence's routing, in order
    batch = BatchEngine(engine, max_batch=2)
    ids = [batch.submit([1, 2], SamplingParams(max_new_tokens=3)) for _ in range(2)]
    events = batch.step()
    assert [e.request_id for e in events] == ids and not batch.has_work()
    assert all(isinstance(e.error, ConfigError) and "replay" in str(e.error) for e in events)
    assert engine.model.calls == []


def test_running_streams_get_a_token_every_step_while_a_long_prompt_joins(tokenizer) -> None:
    engine = fake_engine(tokenizer)
    batch = BatchEngine(engine, max_batch=3, prefill_chunk=4)
    running = [batch.submit([1, 2], SamplingParams(max_new_tokens=30)) for _ in range(2)]
    batch.step()  # both prompts in one step: 4 tokens
    joining = batch.submit(list(range(3, 23)), SamplingParams(max_new_tokens=2))  # 20 tokens: 5 chunks
    engine.model.calls.clear()
    for step in range(5):
        events = batch.step()
        assert [e.request_id for e in events] == running + ([joining] if step == 4 else [])
    assert engine.model.calls == [c for i in range(5) for c in [(2 + i, 1), (2 + i, 1), (4 * i, 4)]]
