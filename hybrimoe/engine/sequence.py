"""One request's generation state, driven a forward pass at a time by `Engine.stream` or `BatchEngine`.

    prompt ──► next_ids() (the prompt, or a chunk of it) ─► forward ─► advance(n, logits)
                                                                       │  prefill done: sample
    [token] ◄── next_ids() ◄────────────────────────── chunk (token, text) ◄┘  or the last chunk

The per-token logic (sampling with the request's generator, penalties, stop ids, stop strings,
incremental detokenisation, the result and its timings) lives here once; the callers only decide
which sequences run in which forward pass.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hybrimoe.engine.sampling import make_generator, sample_next
from hybrimoe.engine.stopping import IncrementalDetokenizer, StopStringFilter
from hybrimoe.engine.types import GenerationResult, SamplingParams, StreamChunk


class _NoText:
    """Detokeniser stand-in for a model without a tokenizer (--dummy-weights without --model): ids, no text."""

    @staticmethod
    def decode(ids: list[int], **_: Any) -> str:
        return ""


class SequenceState:
    """Prompt, KV cache, sampler and stop handling of one checked request (see `Engine.check_request`).

    `pos` = tokens in the KV cache. While `pos < prompt_tokens` the sequence is prefilling; after that
    every forward takes one token (the last sampled one) at position `pos`.
    """

    def __init__(self, engine: Any, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.budget = min(params.max_new_tokens, engine.max_context - self.prompt_tokens)  # tokens we may produce
        self.stop_ids = engine.eos_token_ids | set(params.stop_token_ids)
        self.generator = make_generator(params.seed)
        tokenizer = engine.tokenizer if engine.tokenizer is not None else _NoText()
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringFilter(list(params.stop_strings))
        self.kv = engine.model.new_kv_cache(self.prompt_tokens + self.budget)  # buffers appear on first write
        self.generated: list[int] = []
        self.produced = 0            # tokens sampled, a final stop id included
        self.pos = 0                 # tokens in the KV cache
        self.last_token: int | None = None  # sampled, not yet in the KV cache
        self.prefill_seconds = 0.0   # prompt forwards + first token
        self.decode_seconds = 0.0    # every later forward + sampling
        self.result: GenerationResult | None = None

    @property
    def prefilling(self) -> bool:
        return self.pos < self.prompt_tokens

    @property
    def phase(self) -> str:
        """The routing-trace phase of the next forward: "prefill" or "decode"."""
        return "prefill" if self.prefilling else "decode"

    @property
    def finished(self) -> bool:
        return self.result is not None

    def next_ids(self, limit: int | None = None) -> list[int]:
        """Token ids the next forward takes for this sequence, at positions pos..: the rest of the prompt
        (at most `limit` of it), or the last sampled token."""
        if self.finished:
            raise RuntimeError("the sequence has finished")
        if self.prefilling:
            end = self.prompt_tokens if limit is None else min(self.prompt_tokens, self.pos + max(1, limit))
            return self.prompt_ids[self.pos:end]
        assert self.last_token is not None
        return [self.last_token]

    def advance(self, n_tokens: int, logits: torch.Tensor | None, seconds: float) -> StreamChunk | None:
        """The forward took `n_tokens` of `next_ids()` in `seconds`; `logits` [V] = the last one's.

        Mid-prompt (a prefill chunk that did not reach the prompt's end) returns None; otherwise samples
        the next token and returns its chunk, the last one carrying `finish_reason` and `result`.
        """
        prefill = self.prefilling
        self.pos += n_tokens
        if self.prefilling:
            self.prefill_seconds += seconds
            return None
        assert logits is not None, "logits are needed once the prompt is in the cache"
        start = time.perf_counter()
        with torch.inference_mode():
            token = sample_next(logits, self.params, self.generator, self.generated)
        seconds += time.perf_counter() - start
        if prefill:
            self.prefill_seconds += seconds
        else:
            self.decode_seconds += seconds
        return self._push(token)

    def _push(self, token: int) -> StreamChunk:
        self.produced += 1
        if token in self.stop_ids:
            return self._finish("stop", [], "")
        self.generated.append(token)
        text = self.stops.push(self.detok.push(token))
        if self.stops.stopped:
            return self._finish("stop", [token], text)
        if self.produced >= self.budget:
            return self._finish("length", [token], text)
        self.last_token = token
        return StreamChunk(token_ids=[token], text=text)

    def _finish(self, finish: str, new_ids: list[int], text: str) -> StreamChunk:
        if not self.stops.stopped:
            text += self.stops.push(self.detok.flush())
            text += self.stops.flush()
        produced, decode = self.produced, self.decode_seconds
        self.result = GenerationResult(
            text=self.stops.released_text, token_ids=self.generated, prompt_tokens=self.prompt_tokens,
            completion_tokens=produced, finish_reason=finish, prefill_seconds=self.prefill_seconds,
            decode_seconds=decode, decode_tokens_per_second=(produced - 1) / decode if decode > 0 else 0.0)
        self.last_token = None
        return StreamChunk(token_ids=new_ids, text=text, finish_reason=finish, result=self.result)
