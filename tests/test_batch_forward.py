"""MoETransformer.forward_batch: several sequences in one pass give each sequence's own forward.

Segments mix prefill chunks and one-token decode rows at different positions, each with its own KV
cache already holding a different prefix; for every family (Mixtral with a sliding window shorter than
the sequences, MLA in its expanded and absorbed forms) the last-token logits and the cache contents
equal per-segment `forward` within fp32 tolerance.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import HybrimoeError
from hybrimoe.loader import build_dummy_model
from hybrimoe.tiny import FAMILIES, tiny_config

TOL = 1e-4  # fp32 logits of O(10): a few ulps of reordered sums


@cache
def model_for(family: str):
    top_k = 3 if family.startswith("deepseek") else 2
    overrides = {"sliding_window": 6} if family == "mixtral" else None
    raw = tiny_config(family, 256, [0], layers=3, experts=8, top_k=top_k, hidden=64, overrides=overrides)
    return build_dummy_model(ModelConfig.from_dict(raw.to_dict()), "fp32", seed=1, std=0.1)


# (cached prefix length, new tokens): prefill from scratch, a prefill chunk after a prefix, decode rows
# at different positions (one beyond Mixtral's window of 6), a one-token prompt
LAYOUT = [(0, 7), (5, 4), (9, 1), (3, 1), (0, 1), (14, 1)]


def caches_with_prefixes(model, gen: torch.Generator) -> tuple[list, list, list[torch.Tensor]]:
    """Two identical sets of caches (batched / reference) holding each segment's prefix, and its new ids."""
    batched, solo, new = [], [], []
    for prefix, t in LAYOUT:
        ids = torch.randint(0, 256, (prefix + t,), generator=gen)
        pair = []
        for _ in range(2):
            kv = model.new_kv_cache(prefix + t)
            if prefix:
                model(ids[:prefix], 0, kv)
            pair.append(kv)
        batched.append(pair[0])
        solo.append(pair[1])
        new.append(ids[prefix:])
    return batched, solo, new


def check_batch_equals_solo(model, seed: int = 0) -> None:
    batched, solo, new = caches_with_prefixes(model, torch.Generator().manual_seed(seed))
    segments = [(ids, prefix, kv) for ids, (prefix, _), kv in zip(new, LAYOUT, batched)]
    got = model.forward_batch(segments)  # [S, V]
    assert got.shape == (len(LAYOUT), model.config.vocab_size) and got.dtype == torch.float32
    for i, (ids, (prefix, t), kv) in enumerate(zip(new, LAYOUT, solo)):
        want = model(ids, prefix, kv)[-1]
        err = (got[i] - want).abs().max().item()
        assert err <= TOL, f"segment {i} (prefix {prefix}, {t} new): max |dlogit| {err}"
        assert batched[i].length == kv.length == prefix + t
        for a, b in zip(batched[i].layers, kv.layers):
            assert torch.allclose(a.k[:, :kv.length], b.k[:, :kv.length], atol=TOL)
            assert torch.allclose(a.v[:, :kv.length], b.v[:, :kv.length], atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_batch_equals_each_segments_forward(family: str) -> None:
    check_batch_equals_solo(model_for(family))


@pytest.mark.parametrize("absorb", [True, False])
def test_mla_forms_both_batch(absorb: bool) -> None:
    model = model_for("deepseek-v3")
    blocks = [layer.self_attn for layer in model.model.layers]
    try:
        for attn in blocks:
            attn.absorb = absorb
        check_batch_equals_solo(model, seed=3)
    finally:
        for attn in blocks:
            attn.absorb = None


def test_mla_decode_rows_of_a_batch_take_the_absorbed_path() -> None:
    """The choice is per segment: a decode row of a batch is attended in the absorbed form, a prefill
    chunk in the expanded one, as in their solo forwards."""
    model = model_for("deepseek-v2")
    attn = model.model.layers[0].self_attn
    assert attn.absorbed_is_cheaper(1, 15) and not attn.absorbed_is_cheaper(7, 7)
    calls: list[tuple[str, int]] = []
    for name in ("_attend_absorbed", "_attend_expanded"):
        inner = getattr(attn, name)
        setattr(attn, name, lambda qn, *rest, _inner=inner, _name=name: calls.append((_name, qn.shape[1]))
                or _inner(qn, *rest))
    try:
        batched, _, new = caches_with_prefixes(model, torch.Generator().manual_seed(0))
        calls.clear()
        model.forward_batch([(ids, prefix, kv) for ids, (prefix, _), kv in zip(new, LAYOUT, batched)])
    finally:
        del attn._attend_absorbed, attn._attend_expanded
    assert calls[0] == ("_attend_expanded", 7) and ("_attend_absorbed", 1) in calls


def test_forward_is_the_one_segment_case() -> None:
    model = model_for("qwen3-moe")
    ids = torch.tensor([3, 9, 27, 81, 243 % 256])
    a, b = model.new_kv_cache(8), model.new_kv_cache(8)
    full = model(ids, 0, a)  # [T, V]
    last = model.forward_batch([(ids, 0, b)])  # [1, V]
    assert full.shape == (5, 256) and last.shape == (1, 256)
    assert torch.allclose(full[-1], last[0], atol=TOL)


def test_bad_segments_are_clear_errors() -> None:
    model = model_for("olmoe")
    kv = model.new_kv_cache(8)
    with pytest.raises(HybrimoeError, match="at least one segment"):
        model.forward_batch([])
    with pytest.raises(HybrimoeError, match="share a KV cache"):
        model.forward_batch([(torch.tensor([1]), 0, kv), (torch.tensor([2]), 0, kv)])
    with pytest.raises(HybrimoeError, match="segment 1: start_pos 3 is beyond"):
        model.forward_batch([(torch.tensor([1]), 0, kv), (torch.tensor([2]), 3, model.new_kv_cache(8))])
    with pytest.raises(HybrimoeError, match="segment 0: input_ids must be a non-empty"):
        model.forward_batch([(torch.tensor([], dtype=torch.long), 0, kv), (torch.tensor([2]), 0, model.new_kv_cache(8))])
