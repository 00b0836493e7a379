"""A batched step through the hybrid runtime and the routing recorder.

- The runtime plans one MoE layer over the whole batch: per-expert token counts sum to N * K for the
  step's N tokens; a decode step of B sequences is a decode step (the decode scheduler, the copy
  pipeline's decode rule), a step carrying prompt tokens is a prefill step.
- The recorder writes a batched step under each row's own sequence: the trace of a batch run equals,
  sequence by sequence, the trace of the same requests run one at a time.
"""

from __future__ import annotations

import pytest

from hybrimoe.engine import Engine, RoutingRecorder, SamplingParams, header_for
from hybrimoe.engine.batch import BatchEngine
from hybrimoe.trace import RoutingTrace

PROMPTS = [[5, 17, 42, 9, 77], [3, 120, 64], [8, 8, 30, 31, 32, 33, 34], [11]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def drain(batch: BatchEngine) -> None:
    while batch.has_work():
        for event in batch.step():
            assert event.error is None, event.error


@pytest.mark.parametrize("policy", ["ktransformers", "hybrimoe"])
def test_a_decode_step_of_b_sequences_is_planned_as_decode_with_per_expert_counts(tiny_checkpoint, policy) -> None:
    engine = Engine.from_pretrained(tiny_checkpoint("qwen3-moe"), dtype="fp32", policy=policy, cache_ratio=0.25,
                                    cpu_threads=1)
    rt = engine.runtime
    k = int(engine.model.config.top_k)
    plans: list[tuple[int, int, bool, object]] = []  # (tokens, sum of counts, prefill, scheduler)
    demands: list[bool] = []
    plan_layer, demand = rt.plan_layer, rt.pipeline.demand

    def spy_plan(layer, counts, view, tokens, now):
        plans.append((tokens, sum(counts.values()), rt.is_prefill(tokens), rt.scheduler_for(tokens)))
        return plan_layer(layer, counts, view, tokens, now)

    def spy_demand(layer, plan, now, prefill, current):
        demands.append(prefill)
        return demand(layer, plan, now, prefill, current)
    rt.plan_layer, rt.pipeline.demand = spy_plan, spy_demand
    try:
        batch = BatchEngine(engine, max_batch=4, prefill_chunk=64)
        for prompt in PROMPTS:
            batch.submit(prompt, SamplingParams(max_new_tokens=4))
        drain(batch)
    finally:
        engine.close()
    prefill_tokens = sum(len(p) for p in PROMPTS)
    assert plans[0][:3] == (prefill_tokens, prefill_tokens * k, True)  # all four prompts in one step
    decode = [p for p in plans if not p[2]]
    assert {p[0] for p in decode} == {4}  # four sequences, one token each, every decode step
    assert all(total == tokens * k for tokens, total, _, _ in plans)
    assert all(s is rt.schedulers["decode"] for *_, s in decode)
    assert plans[0][3] is rt.schedulers["prefill"]
    assert demands == [p[2] for p in plans]  # the pipeline's prefill rule follows the step's kind
    calls = rt.stats()["layer_calls"]
    assert calls["decode"] == len(decode) and calls["prefill"] == len(plans) - len(decode)


def test_llamacpp_decides_by_tokens_in_decode_too() -> None:
    from hybrimoe.policy.presets import LLAMACPP_OP_OFFLOAD_MIN_TOKENS, PRESETS

    llama, kt = PRESETS["llamacpp"], PRESETS["ktransformers"]
    n = LLAMACPP_OP_OFFLOAD_MIN_TOKENS
    assert llama.scheduler_role(n, prefill=False) == "prefill" and llama.scheduler_role(n - 1, prefill=False) == "decode"
    assert kt.scheduler_role(64, prefill=False) == "decode" and kt.scheduler_role(2, prefill=True) == "prefill"
    assert kt.scheduler_role(1, prefill=True) == "decode"  # a one-token prompt, as before


def record(engine: Engine, path, batched: bool) -> list[list[int]]:
    """Runs PROMPTS (greedy, 5 tokens) one at a time or batched, recording; returns their token ids."""
    params = SamplingParams(max_new_tokens=5)
    with RoutingRecorder(path, header_for(engine.model.config, "tiny")) as recorder:
        engine.recorder = recorder
        if not batched:
            out = [engine.generate(p, params).token_ids for p in PROMPTS]
        else:
            batch = BatchEngine(engine, max_batch=3, prefill_chunk=4)
            ids = [batch.submit(p, params) for p in PROMPTS]
            done: dict[int, list[int]] = {}
            while batch.has_work():
                for event in batch.step():
                    if event.chunk.result is not None:
                        done[event.request_id] = event.chunk.result.token_ids
            out = [done[i] for i in ids]
    engine.recorder = None
    return out


@pytest.mark.parametrize("family", ["mixtral", "deepseek-v3"])
def test_a_batch_trace_equals_the_solo_traces_sequence_by_sequence(tiny_checkpoint, tmp_path, family) -> None:
    engine = Engine.from_pretrained(tiny_checkpoint(family), dtype="fp32")
    solo_ids = record(engine, tmp_path / "solo.jsonl", batched=False)
    batch_ids = record(engine, tmp_path / "batch.jsonl", batched=True)
    assert batch_ids == solo_ids
    solo, batch = (RoutingTrace.load(tmp_path / f"{n}.jsonl").sequences() for n in ("solo", "batch"))
    assert sorted(solo) == sorted(batch) == list(range(len(PROMPTS)))
    for seq in solo:  # the batch numbers sequences in the order their first tokens ran: here submission order
        a, b = solo[seq], batch[seq]
        assert [(t.pos, t.phase, t.token_id) for t in a] == [(t.pos, t.phase, t.token_id) for t in b]
        fed = PROMPTS[seq] + solo_ids[seq][:-1]
        assert [t.token_id for t in b] == fed
        for x, y in zip(a, b):
            assert {layer: r.experts for layer, r in x.layers.items()} == {layer: r.experts for layer, r in y.layers.items()}
            for layer in x.layers:
                assert x.layers[layer].weights == pytest.approx(y.layers[layer].weights, abs=1e-5)
