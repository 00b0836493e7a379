"""Routing recorder: the trace holds what the model routed, per token, phase and sequence."""

from __future__ import annotations

import pytest
import torch
from engine_fakes import FakeConfig, FakeModel, make_tokenizer

from hybrimoe.engine import Engine, RoutingRecorder, SamplingParams, header_for
from hybrimoe.trace import RoutingTrace


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_fake_model_trace_has_every_fed_token_with_its_routing(tokenizer, tmp_path) -> None:
    model = FakeModel(FakeConfig(vocab_size=len(tokenizer)))
    engine = Engine(model, tokenizer, "fake")
    path = tmp_path / "trace.jsonl"
    prompts = [engine.encode("hello world"), engine.encode("the lazy dog")]
    with RoutingRecorder(path, header_for(model.config, "fake")) as recorder:
        engine.recorder = recorder
        results = [engine.generate(p, SamplingParams(max_new_tokens=5)) for p in prompts]
    trace = RoutingTrace.load(path)
    assert trace.header.moe_layers == [1, 2] and trace.header.num_experts == 4 and trace.header.top_k == 2
    seqs = trace.sequences()
    assert sorted(seqs) == [0, 1]
    for seq, prompt, result in zip(range(2), prompts, results):
        tokens = seqs[seq]
        fed = prompt + result.token_ids[:-1]  # the last sampled token is never fed back
        assert [t.token_id for t in tokens] == fed and [t.pos for t in tokens] == list(range(len(fed)))
        assert [t.phase for t in tokens] == ["prefill"] * len(prompt) + ["decode"] * (len(fed) - len(prompt))
        for t in tokens:
            scores = torch.softmax(model.router[t.token_id], -1)
            expected = torch.topk(scores, 2)
            assert sorted(t.layers) == [1, 2]
            for routing in t.layers.values():
                assert routing.experts == expected.indices.tolist()
                assert routing.weights == pytest.approx(expected.values.tolist(), abs=1e-5)
                assert routing.scores == pytest.approx(scores.tolist(), abs=1e-5)


def test_no_trace_file_is_left_behind_on_error(tokenizer, tmp_path) -> None:
    model = FakeModel(FakeConfig(vocab_size=len(tokenizer)))
    engine = Engine(model, tokenizer, "fake")
    calls = {"n": 0}
    forward = model.forward

    def failing(ids, start_pos, kv):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return forward(ids, start_pos, kv)

    model.forward = failing
    path = tmp_path / "trace.jsonl"
    with pytest.raises(RuntimeError, match="device lost"):
        with RoutingRecorder(path, header_for(model.config, "fake")) as recorder:
            engine.recorder = recorder
            engine.generate(engine.encode("hello"), SamplingParams(max_new_tokens=8))
    assert list(tmp_path.iterdir()) == []
    assert model.routing_observer is None  # the engine restored the model's observer
