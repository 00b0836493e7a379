"""Next-token choice from one row of logits: greedy, or temperature / top-k / top-p sampling, after
OpenAI's logit adjustments (logit_bias, frequency and presence penalties).

Sampling draws from a `torch.Generator` that belongs to the request, so a seed fixes the tokens
regardless of what else ran in the process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hybrimoe.engine.types import SamplingParams
from hybrimoe.errors import HybrimoeError


class NonFiniteLogitsError(HybrimoeError):
    """The model produced NaN or infinite logits: its weights (or their dtype's range) are broken."""


def make_generator(seed: int | None) -> torch.Generator:
    """CPU generator seeded with `seed`, or from fresh OS entropy when `seed` is None."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int]) -> torch.Tensor:
    """Logits [V] (fp32, on the logits' device) after OpenAI's adjustments, before temperature:

        l[j] + logit_bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty

    where count[j] is how often token j occurs among the `generated` tokens of this request (the
    prompt does not count). Returns `logits` itself (not a copy) when nothing is to be adjusted.
    """
    if not params.adjusts_logits:
        return logits
    out = logits.float().clone()  # [V]
    vocab = out.shape[-1]
    if params.logit_bias:
        ids = torch.tensor([i for i in params.logit_bias if i < vocab], dtype=torch.long, device=out.device)
        bias = torch.tensor([b for i, b in params.logit_bias.items() if i < vocab], dtype=out.dtype,
                            device=out.device)
        out.index_add_(0, ids, bias)
    if generated and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long), minlength=vocab)[:vocab]  # [V]
        counts = counts.to(device=out.device, dtype=out.dtype)
        out -= counts * params.frequency_penalty + (counts > 0).to(out.dtype) * params.presence_penalty
    return out


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [V] (fp32) with tokens outside top-k / top-p set to -inf.

    Top-k keeps the k largest logits (ties at the k-th value are kept). Top-p keeps the smallest
    prefix of tokens, by descending probability, whose mass reaches `top_p`; the most likely token
    is always kept.
    """
    scaled = logits.float() / params.temperature  # [V]
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)  # [V]
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                generated: Sequence[int] = ()) -> int:
    """Token id chosen from `logits` [V] (any dtype, any device); `generated` = this request's tokens so
    far (for the penalties). NonFiniteLogitsError if the model's logits hold NaN or +inf."""
    logits = adjust_logits(logits, params, generated)
    best = torch.max(logits, dim=-1)  # NaN propagates into the max: one check covers NaN and +inf
    top = float(best.values)
    if not math.isfinite(top):
        raise NonFiniteLogitsError(f"the model produced non-finite logits (max {top}): its weights hold NaN/inf "
                                   "values or overflow this dtype; check the checkpoint, or try --dtype fp32")
    if params.greedy:  # on the logits' device: one id crosses to the host, not V floats
        return int(best.indices)
    probs = torch.softmax(filter_logits(logits.detach().to("cpu"), params), dim=-1)  # [V], fp32, on the host
    # The generator is a CPU one, so a seed gives the same tokens whatever device ran the model.
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
