"""Routing recorder: the trace holds what the model routed, per token, phase and sequence."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fakes import FakeConfig, FakeModel, make_tokenizer

from hybrimoe.engine import Engine, RoutingRecorder, SamplingParams, header_for
from hybrimoe.trace import RoutingTrace


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("name", ["trace.jsonl", "trace.jsonl.gz"])
def test_fake_model_trace_has_every_fed_token_with_its_routing(tokenizer, tmp_path, name) -> None:
    model = FakeModel(FakeConfig(vocab_size=len(tokenizer)))
    engine = Engine(model, tokenizer, "fake")
    path = tmp_path / name
    prompts = [engine.encode("hello world"), engine.encode("the lazy dog")]
    with RoutingRecorder(path, header_for(model.config, "fake")) as recorder:
        engine.recorder = recorder
        results = [engine.generate(p, SamplingParams(max_new_tokens=5)) for p in prompts]
    assert list(tmp_path.iterdir()) == [path] and (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
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


def hf_routing(model_dir, prompt_ids: list[int], n: int) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(expert ids [T, K], weights [T, K]) of every call of each transformers router (`layers[i].mlp.gate`)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(gate, "weight") and gate.weight.shape[0] > 1:
            gate.register_forward_hook(lambda mod, inp, out, i=i: seen.setdefault(i, []).append((out[2].clone(), out[1].clone())))
    with torch.inference_mode():
        hf.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return seen


@pytest.mark.parametrize("family", ["mixtral", "deepseek-v3"])
def test_recorded_experts_equal_transformers_router_choice(tiny_checkpoint, capsys, tmp_path, family) -> None:
    from transformers import AutoTokenizer

    from hybrimoe.cli import main

    model_dir = tiny_checkpoint(family)
    path = tmp_path / "trace.jsonl"
    assert main(["generate", "--model", str(model_dir), "--prompt", "the quick brown fox", "--dtype", "fp32",
                 "--max-new-tokens", "6", "--json", "--record-trace", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    prompt_ids = AutoTokenizer.from_pretrained(model_dir)("the quick brown fox").input_ids
    trace = RoutingTrace.load(path)
    tokens = trace.sequences()[0]
    n_fed = result["prompt_tokens"] + result["completion_tokens"] - 1
    assert len(tokens) == n_fed and [t.pos for t in tokens] == list(range(n_fed))
    assert [t.phase for t in tokens].count("prefill") == len(prompt_ids)
    assert all(t.phase == "decode" for t in tokens[len(prompt_ids):])
    assert [t.token_id for t in tokens] == prompt_ids + result["token_ids"][:n_fed - len(prompt_ids)]
    assert trace.header.moe_layers and trace.header.model == model_dir.name

    hf = hf_routing(model_dir, prompt_ids, result["completion_tokens"])
    assert sorted(hf) == trace.header.moe_layers
    not_top_k = 0
    for layer, calls in hf.items():
        hf_ids = torch.cat([ids for ids, _ in calls])  # [fed tokens, K]: the prefill call, then one per step
        hf_weights = torch.cat([w for _, w in calls]).float()  # [fed tokens, K]
        assert hf_ids.shape[0] == n_fed
        for t, token in enumerate(tokens):
            routing = token.layers[layer]
            ours = dict(zip(routing.experts, routing.weights))
            theirs = dict(zip(hf_ids[t].tolist(), hf_weights[t].tolist()))
            assert sorted(ours) == sorted(theirs), (layer, t)
            assert [ours[e] for e in sorted(ours)] == pytest.approx([theirs[e] for e in sorted(ours)], abs=1e-4)
            assert len(routing.scores) == trace.header.num_experts
            top = torch.topk(torch.tensor(routing.scores), trace.header.top_k).indices.tolist()
            not_top_k += sorted(top) != sorted(routing.experts)
    if family == "deepseek-v3":
        assert not_top_k > 0, "the tiny DeepSeek-V3 checkpoint should route differently from top-k of scores"


def test_cli_leaves_no_trace_file_when_generation_fails(tiny_checkpoint, capsys, tmp_path) -> None:
    from hybrimoe.cli import main

    path = tmp_path / "trace.jsonl"
    code = main(["generate", "--model", str(tiny_checkpoint("mixtral")), "--prompt", "the quick brown fox",
                 "--max-context", "3", "--record-trace", str(path)])
    assert code == 2 and list(tmp_path.iterdir()) == []
