"""Request and result records of the Engine (see docs/CONTRACTS.md, "Engine side")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hybrimoe.errors import ConfigError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# Temperatures below this sample greedily: logits / 1e-40 overflow fp32 to inf, and softmax of
# infinities is NaN (vLLM draws the same line).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; validated by `validate()` at the edge (CLI, server)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = fresh randomness on every request
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the EOS ids
    stop_strings: list[str] = field(default_factory=list)  # ends before the first occurrence
    # OpenAI's logit adjustments, applied before temperature (greedy too); see sampling.adjust_logits.
    frequency_penalty: float = 0.0  # in [-2, 2]: minus this times the count of the token in the completion
    presence_penalty: float = 0.0  # in [-2, 2]: minus this once the token occurs in the completion
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0

    def validate(self) -> "SamplingParams":
        """Raise ConfigError naming the bad field and what is accepted; return self."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ConfigError(f"seed must be an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]} or None, got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise ConfigError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not isinstance(self.logit_bias, dict) or any(
                not isinstance(t, int) or isinstance(t, bool) or t < 0 or not isinstance(b, (int, float))
                or not -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()):
            raise ConfigError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {self.logit_bias!r}")
        return self


@dataclass
class GenerationResult:
    """One finished request.

    `token_ids` are the generated tokens, without a stop token id that ended generation;
    `completion_tokens` counts every token the model produced, that stop token included
    (the OpenAI `usage` convention). `text` ends before a matched stop string.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    prefill_seconds: float  # prompt forward + first token
    decode_seconds: float  # every later forward + sampling
    decode_tokens_per_second: float  # (completion_tokens - 1) / decode_seconds; 0 if no decode step


@dataclass
class StreamChunk:
    """What `Engine.stream` yields: new tokens and the text that is now certain."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # None while running
    result: GenerationResult | None = None  # the last chunk only
