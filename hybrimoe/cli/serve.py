"""`hybrimoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model."""

from __future__ import annotations

import argparse
from typing import Any

from hybrimoe.cli.generate import add_model_arguments, engine_from_args
from hybrimoe.errors import ConfigError
from hybrimoe.server import DEFAULT_MAX_BODY_BYTES


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI API (HTTP)",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="model id clients must send (default: the model directory's name)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                        help=f"largest request body accepted, bytes (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level (default info)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from hybrimoe.server.app import create_app
    except ModuleNotFoundError as exc:
        raise ConfigError(f"`hybrimoe serve` needs {exc.name}: pip install 'hybrimoe[serve]'") from None
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    engine = engine_from_args(args)
    app = create_app(engine, max_body_bytes=args.max_body_bytes, model_name=args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
