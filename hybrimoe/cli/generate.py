"""`hybrimoe generate`: one completion from a model directory, streamed to stdout or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hybrimoe.engine import Engine, RoutingRecorder, SamplingParams, header_for
from hybrimoe.cli.runtime_args import add_runtime_arguments, runtime_kwargs_from_args
from hybrimoe.cli.paths import check_output_file
from hybrimoe.engine.options import DTYPES
from hybrimoe.errors import ConfigError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the model and how it runs (shared by generate, chat, serve)."""
    parser.add_argument("--model", default=None, metavar="DIR|FILE.gguf",
                        help="Hugging Face model directory, or a GGUF file (or a directory holding one); "
                             "required unless --dummy-weights is given")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads of the dense model and the engine (default: torch's, one per core); "
                             "the CPU expert worker has its own --cpu-threads; a CPU-only engine with --cpu-kernel "
                             "onnxruntime or ggml gives them to that kernel and runs torch at one")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight dtype (default bf16)")
    parser.add_argument("--device", default="cpu", help="torch device of the dense weights (default cpu)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="context length in tokens (default: the model's maximum)")
    add_runtime_arguments(parser)


def runtime_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The one mapping from CLI flags to `Engine.from_pretrained(**runtime_options)`."""
    options: dict[str, Any] = {"device": args.device}
    if args.max_context is not None:
        options["max_context"] = args.max_context
    options.update(runtime_kwargs_from_args(args))
    return options


def set_threads(threads: int | None) -> None:
    """--threads: torch's thread count for this thread and the default of threads started later."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def engine_from_args(args: argparse.Namespace) -> Engine:
    if args.model is None and args.dummy_weights is None:
        raise ConfigError("give --model DIR (a Hugging Face checkpoint), or --dummy-weights CONFIG for random "
                          "weights without a checkpoint (prompts are then token ids: --prompt-ids)")
    set_threads(args.threads)
    return Engine.from_pretrained(args.model, dtype=args.dtype, **runtime_options_from_args(args))


def parse_token_ids(text: str) -> list[int]:
    """'1,2,3' or '1 2 3' -> [1, 2, 3]; ConfigError otherwise."""
    parts = text.replace(",", " ").split()
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected token ids such as 1,2,3") from None
    if not ids or min(ids) < 0:
        raise ConfigError(f"--prompt-ids {text!r}: expected one or more token ids >= 0")
    return ids


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingParams()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, metavar="N")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, metavar="T", help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K", help="0 = off")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop string (repeatable); the text ends before it")
    parser.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                        help="extra stop token id (repeatable), besides the model's EOS ids")
    parser.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                        help="-2..2: lower a token's logit by F for each time it was generated (OpenAI's)")
    parser.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                        help="-2..2: lower a token's logit by P once it was generated (OpenAI's)")
    parser.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS (-100..100) to token ID's logit (repeatable)")


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS such as 42=-100") from None
        if not sep:
            raise ConfigError(f"--logit-bias {item!r}: expected TOKEN_ID=BIAS such as 42=-100")
    return bias


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop_token_ids=list(args.stop_token_id),
                          stop_strings=list(args.stop), frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, logit_bias=_logit_bias(args.logit_bias)).validate()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion for one prompt",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT")
    prompt.add_argument("--prompt-ids", metavar="IDS",
                        help="the prompt as token ids, e.g. 1,2,3 (what a model without a tokenizer needs)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("--record-trace", metavar="FILE", default=None,
                        help="write the routing of every token to FILE (JSON Lines; .gz compresses)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    ids = parse_token_ids(args.prompt_ids) if args.prompt_ids is not None else None
    if ids is not None and args.chat:
        raise ConfigError("--chat needs a text --prompt (token ids are used as they are)")
    if args.model is None and ids is None:
        raise ConfigError("without --model there is no tokenizer: give the prompt as token ids with --prompt-ids "
                          "(e.g. --prompt-ids 1,2,3); the output is then token ids")
    if args.record_trace is not None:
        check_output_file(args.record_trace, "--record-trace")
    engine = engine_from_args(args)
    try:
        if ids is not None:
            prompt_ids = ids
        elif args.chat:
            prompt_ids = engine.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = engine.encode(args.prompt)
        if args.record_trace is None:
            return _generate(engine, prompt_ids, params, args.json)
        header = header_for(engine.model.config, engine.model_name, source="hybrimoe generate")
        with RoutingRecorder(args.record_trace, header) as recorder:
            engine.recorder = recorder
            try:
                return _generate(engine, prompt_ids, params, args.json)
            finally:
                engine.recorder = None
    finally:
        engine.close()  # the hybrid runtime's CPU worker and device slots


def _generate(engine: Engine, prompt_ids: list[int], params: SamplingParams, as_json: bool) -> int:
    if as_json:
        result = engine.generate(prompt_ids, params)
        import torch

        row = {"model": engine.model_name, "text": result.text, "token_ids": result.token_ids,
               "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
               "finish_reason": result.finish_reason, "prefill_seconds": result.prefill_seconds,
               "decode_seconds": result.decode_seconds,
               "decode_tokens_per_second": result.decode_tokens_per_second, "threads": torch.get_num_threads()}
        if engine.runtime is not None:  # cache counters, busy seconds of cpu / gpu / copy link
            row["runtime"] = engine.runtime.stats()
        print(json.dumps(row))
        return 0
    ids_only = engine.tokenizer is None  # no tokenizer: the output is token ids, one line
    for chunk in engine.stream(prompt_ids, params):
        sys.stdout.write(" ".join(map(str, chunk.token_ids)) + " " if ids_only and chunk.token_ids else chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
