"""OpenAI's logit adjustments (logit_bias, frequency and presence penalties) against a hand computation,
and the refusal of non-finite logits."""

from __future__ import annotations

import pytest
import torch

from hybrimoe.engine.sampling import NonFiniteLogitsError, adjust_logits, make_generator, sample_next
from hybrimoe.engine.types import SamplingParams
from hybrimoe.errors import ConfigError

LOGITS = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0])


def test_penalties_and_bias_match_a_hand_computation() -> None:
    params = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25,
                            logit_bias={2: 1.5, 4: -100.0})
    generated = [1, 1, 3, 1]  # token 1 three times, token 3 once; the prompt never counts
    # token 0: 1.0                         (absent, no bias)
    # token 1: 2.0 - 3 * 0.5 - 0.25 = 0.25
    # token 2: 0.5 + 1.5            = 2.0  (absent, biased up)
    # token 3: -1.0 - 0.5 - 0.25    = -1.75
    # token 4: 3.0 - 100            = -97.0
    expected = [1.0, 0.25, 2.0, -1.75, -97.0]
    assert adjust_logits(LOGITS, params, generated).tolist() == pytest.approx(expected)
    assert LOGITS.tolist() == [1.0, 2.0, 0.5, -1.0, 3.0], "the model's logits are not modified in place"
    # Sampling draws from softmax(adjusted / T): check the distribution the draws follow.
    gen = make_generator(0)
    draws = [sample_next(LOGITS, params, gen, generated) for _ in range(4000)]
    probs = torch.softmax(torch.tensor(expected), -1).tolist()
    for token in range(5):
        assert abs(draws.count(token) / 4000 - probs[token]) < 0.03, (token, draws.count(token), probs)


def test_greedy_honours_the_adjustments() -> None:
    greedy = SamplingParams()
    assert sample_next(LOGITS, greedy, make_generator(0)) == 4
    assert sample_next(LOGITS, SamplingParams(logit_bias={4: -100.0}), make_generator(0)) == 1
    # Token 4 already said twice: 3.0 - 2 * 0.8 = 1.4 < 2.0 (token 1), so the greedy choice moves on.
    assert sample_next(LOGITS, SamplingParams(frequency_penalty=0.8), make_generator(0), [4, 4]) == 1
    assert sample_next(LOGITS, SamplingParams(frequency_penalty=0.8), make_generator(0), [4]) == 4
    # Presence counts once: 3.0 - 1.5 = 1.5 < 2.0 however often 4 was said.
    assert sample_next(LOGITS, SamplingParams(presence_penalty=1.5), make_generator(0), [4, 4, 4]) == 1
    # A negative penalty encourages repetition.
    assert sample_next(LOGITS, SamplingParams(presence_penalty=-2.0), make_generator(0), [0]) == 0


def test_no_adjustment_returns_the_logits_untouched() -> None:
    assert adjust_logits(LOGITS, SamplingParams(), [1, 2, 3]) is LOGITS


@pytest.mark.parametrize("fields", [{"frequency_penalty": 2.5}, {"presence_penalty": -3.0},
                                    {"logit_bias": {1: 101.0}}, {"logit_bias": {-1: 1.0}}])
def test_out_of_range_adjustments_are_refused(fields: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(fields))):
        SamplingParams(**fields).validate()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_a_clear_error(bad: float, temperature: float) -> None:
    logits = LOGITS.clone()
    logits[2] = bad
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        sample_next(logits, SamplingParams(temperature=temperature), make_generator(0))
