"""Our model computes what the `transformers` implementation of each family computes.

For every family and both on-disk expert layouts: fp32 logits of a 16-token prompt within 1e-4 of
transformers', 16 greedy tokens identical (and the logits of each cached decode step), and decoding with the KV cache (prefill, a second prefill
chunk, then one token at a time) gives the logits of a full recomputation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hybrimoe.loader import load_model
from hybrimoe.models import MoETransformer
from hybrimoe.moe import ReferenceExecutor, RoutingRecord
from hybrimoe.tiny import FAMILIES

PROMPT_LEN = 16
NEW_TOKENS = 16
ATOL = 1e-4

CASES = [(f, layout) for f in FAMILIES for layout in ("per-expert", "fused")]


def prompt_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


def reference_greedy(ref, ids: torch.Tensor, steps: int) -> list[int]:
    """transformers greedy decoding by full recomputation (no cache): ids [T] -> new token ids."""
    seq = ids.clone()
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(ref(seq[None]).logits[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    return out


def cached_greedy(model: MoETransformer, ids: torch.Tensor, steps: int,
                  first_chunk: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Our greedy decoding with the KV cache: prefill (optionally in two chunks), then one token a step.

    Returns the new tokens and the logits that chose them [steps, V].
    """
    kv = model.new_kv_cache(len(ids) + steps)
    if first_chunk:
        model(ids[:first_chunk], 0, kv)
        logits = model(ids[first_chunk:], first_chunk, kv)[-1]
    else:
        logits = model(ids, 0, kv)[-1]
    tokens, chosen = [], []
    for _ in range(steps):
        chosen.append(logits)
        nxt = int(logits.argmax())
        tokens.append(nxt)
        logits = model(torch.tensor([nxt]), kv.length, kv)[-1]
    return tokens, torch.stack(chosen)


@pytest.mark.parametrize("family,layout", CASES)
def test_logits_and_greedy_tokens_match_transformers(tiny_checkpoint, family: str, layout: str) -> None:
    path = tiny_checkpoint(family, layout)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, dtype="fp32", progress=False)
    ids = prompt_ids(model.config.vocab_size)

    with torch.no_grad():
        want = ref(ids[None]).logits[0].float()
    got = model(ids, 0, model.new_kv_cache(PROMPT_LEN))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()

    ours, step_logits = cached_greedy(model, ids, NEW_TOKENS)
    assert ours == reference_greedy(ref, ids, NEW_TOKENS)
    # the logits of every cached decode step too (Mixtral: positions past its 24-token sliding window)
    with torch.no_grad():
        full = ref(torch.cat([ids, torch.tensor(ours)])[None]).logits[0]
    assert torch.allclose(step_logits, full[PROMPT_LEN - 1:-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_recompute(tiny_checkpoint, family: str) -> None:
    model = load_model(tiny_checkpoint(family), progress=False)
    ids = prompt_ids(model.config.vocab_size, seed=2)
    tokens, step_logits = cached_greedy(model, ids, 8, first_chunk=5)
    seq = torch.cat([ids, torch.tensor(tokens)])
    full = model(seq, 0, model.new_kv_cache(len(seq)))          # [T, V]
    assert torch.allclose(step_logits, full[PROMPT_LEN - 1:-1], atol=ATOL, rtol=0)


def test_rewinding_the_cache_recomputes_the_same_logits(tiny_checkpoint) -> None:
    model = load_model(tiny_checkpoint("qwen3-moe"), progress=False)
    ids = prompt_ids(model.config.vocab_size, seed=3)
    kv = model.new_kv_cache(32)
    first = model(ids, 0, kv)
    model(torch.tensor([5, 6, 7]), PROMPT_LEN, kv)
    again = model(ids[10:], 10, kv)        # rewind to a 10-token prefix and redo the rest
    assert kv.length == PROMPT_LEN
    assert torch.allclose(again, first[10:], atol=ATOL, rtol=0)


def test_observer_sees_every_moe_layer_and_executor_is_swappable(tiny_checkpoint) -> None:
    model = load_model(tiny_checkpoint("qwen2-moe"), progress=False)
    cfg = model.config
    assert cfg.moe_layers == (0, 2) and set(model.moe_blocks) == {0, 2}   # layer 1 is dense (mlp_only_layers)
    records: list[RoutingRecord] = []
    model.routing_observer = lambda layer, rec: records.append(rec)
    calls: list[tuple[int, int]] = []

    class CountingExecutor(ReferenceExecutor):
        def run(self, layer, x, expert_ids, weights):
            calls.append((layer, x.shape[0]))
            return super().run(layer, x, expert_ids, weights)

    ids = prompt_ids(cfg.vocab_size)
    base = model(ids, 0, model.new_kv_cache(PROMPT_LEN))
    model.set_executor(CountingExecutor(model.expert_store))
    swapped = model(ids, 0, model.new_kv_cache(PROMPT_LEN))
    assert torch.equal(base, swapped)
    assert calls == [(0, PROMPT_LEN), (2, PROMPT_LEN)]
    assert [r.layer for r in records] == [0, 2, 0, 2]
    rec = records[0]
    assert rec.expert_ids.shape == (PROMPT_LEN, cfg.top_k) and rec.expert_ids.dtype == torch.long
    assert rec.weights.shape == (PROMPT_LEN, cfg.top_k)
    assert rec.scores.shape == (PROMPT_LEN, cfg.num_experts)
    assert torch.allclose(rec.scores.sum(-1), torch.ones(PROMPT_LEN))           # softmax scores
    # norm_topk_prob is False for this model: weights are the raw top-k softmax scores
    assert torch.allclose(rec.weights, rec.scores.gather(1, rec.expert_ids))


def test_qwen2_renormalised_topk_matches_transformers(tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen2-moe", overrides={"norm_topk_prob": True})
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, progress=False)
    assert model.config.norm_topk_prob
    ids = prompt_ids(model.config.vocab_size)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert torch.allclose(model(ids, 0, model.new_kv_cache(PROMPT_LEN)), want, atol=ATOL, rtol=0)


def test_tied_embeddings_match_transformers(tiny_checkpoint) -> None:
    path = tiny_checkpoint("olmoe", overrides={"tie_word_embeddings": True})
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, progress=False)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = prompt_ids(model.config.vocab_size)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert torch.allclose(model(ids, 0, model.new_kv_cache(PROMPT_LEN)), want, atol=ATOL, rtol=0)


def test_deepseek_v3_tiny_routing_depends_on_the_correction_bias(tiny_checkpoint) -> None:
    """The tiny V3 checkpoint exercises the bias: zeroing it changes which experts some tokens use."""
    model = load_model(tiny_checkpoint("deepseek-v3"), progress=False)
    ids = prompt_ids(model.config.vocab_size)

    def chosen() -> list[torch.Tensor]:
        records: list[RoutingRecord] = []
        model.routing_observer = lambda layer, rec: records.append(rec)
        model(ids, 0, model.new_kv_cache(PROMPT_LEN))
        return [r.expert_ids.sort(-1).values for r in records]

    with_bias = chosen()
    for block in model.moe_blocks.values():
        block.gate.e_score_correction_bias.zero_()
    without = chosen()
    assert any(not torch.equal(a, b) for a, b in zip(with_bias, without))


def test_qwen3_with_yarn_rope_scaling_matches_transformers(tiny_checkpoint) -> None:
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}
    path = tiny_checkpoint("qwen3-moe", overrides={"rope_parameters": yarn})
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, progress=False)
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    ids = prompt_ids(model.config.vocab_size)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    assert torch.allclose(model(ids, 0, model.new_kv_cache(PROMPT_LEN)), want, atol=ATOL, rtol=0)
