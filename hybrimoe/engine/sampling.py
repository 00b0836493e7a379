"""Next-token choice from one row of logits: greedy, or temperature / top-k / top-p sampling.

Sampling draws from a `torch.Generator` that belongs to the request, so a seed fixes the tokens
regardless of what else ran in the process.
"""

from __future__ import annotations

import torch

from hybrimoe.engine.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """CPU generator seeded with `seed`, or from fresh OS entropy when `seed` is None."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


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


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Token id chosen from `logits` [V] (any dtype, any device)."""
    if params.greedy:  # on the logits' device: one id crosses to the host, not V floats
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits.detach().to("cpu"), params), dim=-1)  # [V], fp32, on the host
    # The generator is a CPU one, so a seed gives the same tokens whatever device ran the model.
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
