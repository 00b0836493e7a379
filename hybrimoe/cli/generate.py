"""`hybrimoe generate`: one completion from a model directory, streamed to stdout or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hybrimoe.engine import Engine, RoutingRecorder, SamplingParams, header_for
from hybrimoe.cli.runtime_args import add_runtime_arguments, runtime_kwargs_from_args
from hybrimoe.engine.options import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose the model and how it runs (shared by generate, chat, serve, bench)."""
    parser.add_argument("--model", required=True, metavar="DIR|FILE.gguf",
                        help="Hugging Face model directory, or a GGUF file (or a directory holding one)")
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


def engine_from_args(args: argparse.Namespace) -> Engine:
    return Engine.from_pretrained(args.model, dtype=args.dtype, **runtime_options_from_args(args))


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


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop_token_ids=list(args.stop_token_id),
                          stop_strings=list(args.stop)).validate()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion for one prompt",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("--record-trace", metavar="FILE", default=None,
                        help="write the routing of every token to FILE (JSON Lines; .gz compresses)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    engine = engine_from_args(args)
    try:
        prompt_ids = engine.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat \
            else engine.encode(args.prompt)
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
        row = {"model": engine.model_name, "text": result.text, "token_ids": result.token_ids,
               "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
               "finish_reason": result.finish_reason, "prefill_seconds": result.prefill_seconds,
               "decode_seconds": result.decode_seconds,
               "decode_tokens_per_second": result.decode_tokens_per_second}
        if engine.runtime is not None:  # cache counters, busy seconds of cpu / gpu / copy link
            row["runtime"] = engine.runtime.stats()
        print(json.dumps(row))
        return 0
    for chunk in engine.stream(prompt_ids, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
