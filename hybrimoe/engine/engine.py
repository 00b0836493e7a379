"""Engine: one sequence at a time through a MoETransformer, prefill then decode with a KV cache.

    prompt ids ─► prefill forward [P] ─► sample ─► (decode forward [1] ─► sample)* ─► result
                                                 │
                         detokenise incrementally ─► hold back possible stop strings ─► chunks
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import torch
from jinja2 import TemplateError  # transformers renders chat templates with jinja2

from hybrimoe.engine.forward import Segment, forward_segments
from hybrimoe.engine.options import EngineOptions, check_dtype
from hybrimoe.engine.recorder import RoutingRecorder
from hybrimoe.engine.sequence import SequenceState
from hybrimoe.engine.types import GenerationResult, SamplingParams, StreamChunk
from hybrimoe.errors import CheckpointError, ConfigError, HybrimoeError

log = logging.getLogger(__name__)


class PromptError(HybrimoeError, ValueError):
    """A prompt the engine cannot run: empty, too long for the context, or a malformed chat."""


def _eos_ids(model_dir: Path | None, config: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the model config, generation_config.json and the tokenizer."""
    ids: set[int] = {int(i) for i in (getattr(config, "eos_token_ids", None) or ())}
    path = None if model_dir is None else model_dir / "generation_config.json"
    if path is not None and path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(int(i) for i in ([eos] if isinstance(eos, int) else (eos or [])))
        except (ValueError, TypeError, AttributeError) as exc:  # bad JSON, not an object, not ids
            raise CheckpointError(f"{path}: cannot read eos_token_id (an id or a list of ids): {exc}") from None
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# A checkpoint's tokenizer comes in one of these files (transformers builds an empty one without them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tiktoken.model", "sentencepiece.bpe.model")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _dummy_name(dummy_weights: str) -> str:
    path = Path(dummy_weights)
    return f"dummy-{path.parent.resolve().name if path.name == 'config.json' else path.stem}"


class Engine:
    """Generation over a `MoETransformer` (docs/CONTRACTS.md, "Engine side"). Not thread-safe.

    `tokenizer` is None for a model without one (random weights, no checkpoint): prompts are then token
    ids, and the output is token ids with empty text."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str,
                 options: EngineOptions | None = None, model_dir: str | os.PathLike | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.options = options or EngineOptions()
        limit = int(model.config.max_position_embeddings)
        self.max_context = min(limit, self.options.max_context) if self.options.max_context else limit
        self.eos_token_ids = _eos_ids(Path(model_dir) if model_dir else None, model.config, tokenizer)
        self.recorder: RoutingRecorder | None = None
        self.runtime: Any = None  # hybrimoe.moe.runtime.HybridRuntime when a placement policy runs
        self._stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                       "prefill_seconds": 0.0, "decode_seconds": 0.0}

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike | None, dtype: str = "fp32",
                        **runtime_options: Any) -> "Engine":
        """Model + tokenizer from a Hugging Face directory or a GGUF file (or a directory holding one;
        tokenizer and chat template then come from the file: docs/GGUF.md). Options named by
        `EngineOptions` configure the engine; the
        rest (policy, expert_cache_bytes, cache_ratio, ...: `hybrimoe.runtime_options.RuntimeOptions`)
        install the hybrid runtime. Without any of the latter the plain reference executor runs.
        `model_dir` may be None with `dummy_weights`: random weights and no tokenizer."""
        from transformers import AutoTokenizer

        from hybrimoe.gguf.files import gguf_model_name, is_gguf_path
        from hybrimoe.loader import load_model

        engine_keys = {f.name for f in fields(EngineOptions)}
        options = EngineOptions.from_kwargs(**{k: v for k, v in runtime_options.items() if k in engine_keys})
        hybrid = {k: v for k, v in runtime_options.items() if k not in engine_keys}
        if model_dir is None:
            if not hybrid.get("dummy_weights"):
                raise ConfigError("give a model directory (--model DIR), or --dummy-weights CONFIG for random "
                                  "weights without a checkpoint")
            from hybrimoe.moe.install import load_with_runtime
            from hybrimoe.runtime_options import RuntimeOptions

            model, runtime = load_with_runtime(None, check_dtype(dtype),
                                               RuntimeOptions.from_kwargs(device=options.device, **hybrid),
                                               cpu_kernel=options.cpu_kernel, **options.weight_formats())
            engine = cls(model.eval(), None, _dummy_name(hybrid["dummy_weights"]), options)
            engine.runtime = runtime
            return engine
        path = Path(model_dir)
        gguf = is_gguf_path(path)   # a .gguf file (or split part), or a directory holding one
        if not path.is_dir() and not gguf:
            raise CheckpointError(f"model directory not found: {path}")
        if not gguf and not any((path / name).is_file() for name in TOKENIZER_FILES):
            # checked before any weight is read (a GGUF file carries its own tokenizer)
            raise CheckpointError(f"{path} has no tokenizer ({' / '.join(TOKENIZER_FILES[:2])} ...): copy the "
                                  "model's tokenizer files there, or use --dummy-weights with --prompt-ids")
        runtime = None
        if hybrid:
            from hybrimoe.moe.install import load_with_runtime
            from hybrimoe.runtime_options import RuntimeOptions

            model, runtime = load_with_runtime(str(path), check_dtype(dtype),
                                               RuntimeOptions.from_kwargs(device=options.device, **hybrid),
                                               cpu_kernel=options.cpu_kernel, **options.weight_formats())
        else:
            from hybrimoe.moe.cpu_kernels import apply_cpu_kernel, leave_cores_to_onnxruntime

            model = load_model(path, dtype=check_dtype(dtype), device=options.device, **options.weight_formats())
            # no runtime: nothing copies experts to a GPU, so the store's bytes go as the sessions are built
            apply_cpu_kernel(model, options.cpu_kernel, release_store=True)
            if options.cpu_kernel != "torch" and model.device.type == "cpu":
                leave_cores_to_onnxruntime()  # (ggml's thread pool too)
        model.eval()
        try:
            if gguf:
                from hybrimoe.gguf.tokenizer import load_gguf_tokenizer
                tokenizer = load_gguf_tokenizer(path)
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, CheckpointError) as exc:
            if runtime is not None:
                runtime.close()
            raise CheckpointError(f"cannot load a tokenizer from {path}: {_first_line(exc)}") from None
        name = gguf_model_name(path) if gguf else path.resolve().name
        engine = cls(model, tokenizer, name, options, model_dir=path if path.is_dir() else None)
        engine.runtime = runtime
        return engine

    def close(self) -> None:
        """Stops the hybrid runtime's worker and frees its device memory (no-op without a runtime)."""
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    # -- prompts ---------------------------------------------------------------------------------
    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise PromptError(f"{self.model_name} has no tokenizer (random weights without a checkpoint): give the "
                              "prompt as token ids")

    def encode(self, text: str) -> list[int]:
        self._need_tokenizer()
        return list(self.tokenizer(text).input_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, ending where the assistant's reply starts.

        Uses the tokenizer's chat template when it has one; otherwise "role: content" lines
        followed by "assistant:".
        """
        if not isinstance(messages, list) or not messages or any(
                not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
                for m in messages):
            raise PromptError("a chat is a non-empty list of {'role': str, 'content': str} messages")
        self._need_tokenizer()
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as exc:  # e.g. a template that wants alternating user/assistant roles
                raise PromptError(f"the model's chat template refuses this chat: {exc}") from None
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self.encode(text)

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise PromptError("the prompt is empty")
        if len(prompt_ids) > self.max_context - 1:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens; this model's context holds "
                              f"{self.max_context}, so at most {self.max_context - 1} prompt tokens fit")
        vocab = int(self.model.config.vocab_size)
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}")

    # -- generation ------------------------------------------------------------------------------
    def _forward(self, ids: list[int], start_pos: int, kv: Any, phase: str) -> torch.Tensor:
        """Logits [V] of the last of `ids`, the recorder (if any) seeing this step's routing."""
        return forward_segments(self, [Segment(None, ids, start_pos, kv, phase)])[0]

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as ints after checking it and `params` (ConfigError / PromptError naming the problem)."""
        params.validate()
        prompt_ids = [int(t) for t in prompt_ids]
        self._check_prompt(prompt_ids)
        vocab = int(self.model.config.vocab_size)
        outside = sorted(t for t in params.logit_bias if t >= vocab)
        if outside:
            raise PromptError(f"logit_bias names token ids {outside[:5]} outside the vocabulary 0..{vocab - 1}")
        return prompt_ids

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[StreamChunk]:
        """Chunks as tokens are generated; the last one carries `finish_reason` and `result`.

        Parameters and prompt are checked here, before the first chunk is asked for.
        """
        return self._run(SequenceState(self, self.check_request(prompt_ids, params), params))

    def _run(self, seq: SequenceState) -> Iterator[StreamChunk]:
        """Drives one sequence: the whole prompt in one forward, then one token per forward."""
        try:
            while True:
                ids = seq.next_ids()
                start = time.perf_counter()
                with torch.inference_mode():
                    logits = self._forward(ids, seq.pos, seq.kv, seq.phase)
                chunk = seq.advance(len(ids), logits, time.perf_counter() - start)
                assert chunk is not None  # the whole prompt went in
                if chunk.result is not None:
                    break
                yield chunk
        finally:
            if self.recorder is not None:
                self.recorder.end_sequence()
        self._account(chunk.result)
        yield chunk

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        for chunk in self.stream(prompt_ids, params):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")

    def _account(self, result: GenerationResult) -> None:
        self._stats["requests"] += 1
        self._stats["prompt_tokens"] += result.prompt_tokens
        self._stats["completion_tokens"] += result.completion_tokens
        self._stats["prefill_seconds"] += result.prefill_seconds
        self._stats["decode_seconds"] += result.decode_seconds
        log.debug("request: %d prompt + %d completion tokens, prefill %.3fs, %.1f decode tok/s",
                  result.prompt_tokens, result.completion_tokens, result.prefill_seconds,
                  result.decode_tokens_per_second)

    def stats(self) -> dict[str, float]:
        """Cumulative counters since the engine was made (tokens, seconds, requests), plus the hybrid
        runtime's cache counters and busy seconds per device when one runs."""
        out = dict(self._stats)
        if self.runtime is not None:
            out.update(self.runtime.metrics())
        return out
