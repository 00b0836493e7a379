"""Sampling filters, incremental detokenisation and stop-string hold-back (no model needed)."""

from __future__ import annotations

import pytest
import torch
from engine_fakes import make_tokenizer

from hybrimoe.engine.sampling import filter_logits, make_generator, sample_next
from hybrimoe.engine.stopping import IncrementalDetokenizer, StopStringFilter
from hybrimoe.engine.types import SamplingParams
from hybrimoe.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.5])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert kept.tolist() == [False, True, False, False, True]


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=p))).tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # the most likely token always survives


def test_temperature_scales_the_distribution() -> None:
    logits = torch.tensor([1.0, 0.0])
    hot = torch.softmax(filter_logits(logits, SamplingParams(temperature=10.0)), -1)
    cold = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.1)), -1)
    assert 0.5 < hot[0] < 0.55 and cold[0] > 0.9999


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    params = SamplingParams(temperature=1.0, top_k=2, seed=0)
    gen = make_generator(0)
    draws = [sample_next(logits, params, gen) for _ in range(3000)]
    assert 2 not in draws
    assert abs(draws.count(0) / 3000 - 2 / 3) < 0.04


def test_same_seed_same_draws_and_greedy_is_argmax() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.5, seed=7)
    a = [sample_next(logits, params, g) for g in [make_generator(7)] for _ in range(20)]
    b = [sample_next(logits, params, g) for g in [make_generator(7)] for _ in range(20)]
    c = [sample_next(logits, params, g) for g in [make_generator(8)] for _ in range(20)]
    assert a == b and a != c
    assert sample_next(logits, SamplingParams(), make_generator(0)) == int(logits.argmax())
    # A temperature so small that logits / T overflows is greedy, not a NaN distribution.
    assert sample_next(logits * 10, SamplingParams(temperature=1e-40), make_generator(0)) == int(logits.argmax())


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-2), dict(stop_strings=[""]),
                                 dict(stop_token_ids=[-1]), dict(temperature=float("nan")),
                                 dict(seed=2**64), dict(seed=-(2**63) - 1)])
def test_bad_params_are_rejected(bad: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**bad).validate()


def test_detokenizer_deltas_concatenate_to_decode_and_never_split_a_character(tokenizer) -> None:
    text = "café naïve — 東京 ✓ 🙂 the quick fox"
    ids = tokenizer(text).input_ids
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


def test_detokenizer_flush_emits_an_incomplete_tail(tokenizer) -> None:
    ids = tokenizer("東").input_ids
    assert len(ids) > 1, "the character must span tokens, or nothing is held back"
    detok = IncrementalDetokenizer(tokenizer)
    held = [detok.push(t) for t in ids[:-1]]
    assert "".join(held) == ""
    tail = detok.flush()
    assert tail == tokenizer.decode(ids[:-1]) and tail.endswith("\ufffd")


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], StopStringFilter]:
    f = StopStringFilter(stops)
    out = [f.push(p) for p in pieces]
    if not f.stopped:
        out.append(f.flush())
    return out, f


def test_stop_string_across_pieces_is_cut_and_held_text_not_leaked() -> None:
    out, f = feed(["STOP"], ["hello S", "T", "OP and more"])
    assert out == ["hello ", "", ""] and f.stopped and f.released_text == "hello "


def test_false_start_is_released_once_it_cannot_match() -> None:
    out, f = feed(["STOP"], ["a ST", "X b"])
    assert out == ["a ", "STX b", ""] and not f.stopped and f.released_text == "a STX b"


def test_first_of_several_stop_strings_wins() -> None:
    out, f = feed(["END", "the"], ["go to the END"])
    assert f.released_text == "go to " and f.stopped


def test_held_back_text_is_flushed_at_the_end() -> None:
    out, f = feed(["STOP"], ["abc ST"])
    assert out == ["abc ", "ST"] and f.released_text == "abc ST"


def test_overlapping_prefix_is_held_for_the_longest_candidate() -> None:
    out, f = feed(["aab"], ["xa", "a", "ab"])
    assert f.stopped and f.released_text == "xa"
