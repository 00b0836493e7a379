"""`hybrimoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from hybrimoe.cli.generate import add_model_arguments, engine_from_args, set_threads
from hybrimoe.errors import ConfigError
from hybrimoe.server.options import (
    API_KEY_ENV,
    BODY_BYTES_BASE,
    BODY_BYTES_PER_TOKEN,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_SHUTDOWN_TIMEOUT,
    ServerOptions,
    is_loopback,
)

log = logging.getLogger(__name__)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI API (HTTP)",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model id clients must send (default: the model directory's name)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default info)")
    group = parser.add_argument_group("admission, access and timeouts")
    group.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                       help=f"sequences decoded together (continuous batching): a request joins the running "
                            f"batch while fewer than N run; the KV cache of N sequences at the context must "
                            f"fit in memory (checked at start). 1 = one request at a time (default "
                            f"{DEFAULT_MAX_BATCH})")
    group.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                       help=f"with --max-batch > 1: prompt tokens per step for the requests joining the batch, "
                            f"so that running streams keep getting a token every step (default {DEFAULT_PREFILL_CHUNK})")
    group.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"requests that may wait for the engine besides the running ones; more get 429 "
                            f"with Retry-After (default {DEFAULT_MAX_QUEUE})")
    group.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help=f"require 'Authorization: Bearer KEY' on /v1/* and /metrics (repeatable; also "
                            f"${API_KEY_ENV}, comma-separated); /health stays open")
    group.add_argument("--allowed-hosts", type=_names, default=None, metavar="H[,H...]",
                       help="Host header names accepted, '*' = any (default: localhost, 127.0.0.1, ::1 when "
                            "bound to loopback, else any)")
    group.add_argument("--allowed-origins", type=_names, default=(), metavar="URL[,URL...]",
                       help="browser origins allowed to call the API, with CORS headers for them ('*' = any; "
                            "default: none, no CORS)")
    group.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                       help=f"largest request body, bytes (default {BODY_BYTES_BASE} + {BODY_BYTES_PER_TOKEN} "
                            "x the context length)")
    group.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="S",
                       help=f"seconds to receive a request body, else 408 (default {DEFAULT_BODY_TIMEOUT:g})")
    group.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="S",
                       help=f"seconds to receive request headers, else the connection is closed "
                            f"(default {DEFAULT_HEADER_TIMEOUT:g})")
    group.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_TIMEOUT, metavar="S",
                       help=f"idle seconds before a keep-alive connection closes (default {DEFAULT_KEEP_ALIVE_TIMEOUT:g})")
    group.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="S",
                       help=f"on SIGTERM, seconds the running request may take to finish before it is ended "
                            f"with an error (default {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    parser.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    keys = list(args.api_key) + list(_names(os.environ.get(API_KEY_ENV, "")))
    return ServerOptions(bind_host=args.host, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                         max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, api_keys=tuple(dict.fromkeys(keys)), allowed_hosts=args.allowed_hosts,
                         allowed_origins=tuple(args.allowed_origins), body_timeout=args.body_timeout,
                         header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                         shutdown_timeout=args.shutdown_timeout, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    try:
        from hybrimoe.server.app import create_app
        from hybrimoe.server.runner import run_server
    except ModuleNotFoundError as exc:
        raise ConfigError(f"`hybrimoe serve` needs {exc.name}: pip install 'hybrimoe[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    options = options_from_args(args)  # every flag checked before the model loads
    if not is_loopback(args.host) and not options.api_keys:
        log.warning("listening on %s without an API key: anyone who can reach this address can use the "
                    "server (serve --api-key)", args.host)
    set_threads(args.threads)
    engine = engine_from_args(args)
    if getattr(engine, "tokenizer", None) is None:
        log.info("the model has no tokenizer: clients must send prompts as token ids (/v1/completions)")
    run_server(create_app(engine, options, model_name=args.served_model_name), args.host, args.port,
               args.log_level)
    return 0
