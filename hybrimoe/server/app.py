"""The FastAPI application: OpenAI-compatible endpoints over one Engine.

    HTTP ─► Guard (Host, Origin, API key, JSON) ─► [CORS] ─► BodyLimit (size, timeout)
        ─► handler: parse + check ─► admit (429 beyond --max-queue) ─► tokenise + size (tokenizer pool)
        ─► EngineWorker queue ─► engine thread: a batch of up to --max-batch requests, one step at a time
        ◄── each request's events on its own asyncio.Queue ◄── its tokens

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET|HEAD /health,
GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.middleware.cors import CORSMiddleware

from hybrimoe.server.batching import Stepper
from hybrimoe.server.encoding import PromptEncoder
from hybrimoe.server.errors import APIError, install_error_handlers
from hybrimoe.server.guards import GuardMiddleware
from hybrimoe.server.jobs import ClientGone, admission_error, start_job
from hybrimoe.server.metrics import CONTENT_TYPE, ServerMetrics
from hybrimoe.server.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from hybrimoe.server.options import ServerOptions
from hybrimoe.server.prompts import check_common, parse_body, prepare_chat, prepare_completion
from hybrimoe.server.responses import CLIENT_CLOSED_REQUEST, chat_response, completion_response
from hybrimoe.server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from hybrimoe.server.worker import EngineWorker, QueueFull, Unavailable

log = logging.getLogger(__name__)

ENDPOINTS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"})
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class ServerState:
    worker: EngineWorker
    encoder: PromptEncoder
    metrics: ServerMetrics
    options: ServerOptions
    model_name: str
    max_context: int
    created: int
    shutdown_tasks: list[asyncio.Task] = field(default_factory=list)

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests (503), fail the queued ones (503), and give the running ones
        `shutdown_timeout` seconds before they are ended with an error (an error event when streaming)."""
        error = APIError(503, SHUTTING_DOWN, type_="service_unavailable", code="shutting_down")
        failed = self.worker.drain(error)
        log.info("shutting down: %d queued request(s) refused; the running ones have %g s to finish",
                 failed, self.options.shutdown_timeout)

        async def abort_later() -> None:
            await asyncio.sleep(self.options.shutdown_timeout)
            if self.worker.abort_running(error):
                log.warning("shutdown timeout (%g s): the running requests were ended with an error",
                            self.options.shutdown_timeout)

        self.shutdown_tasks.append(asyncio.ensure_future(abort_later()))


def create_app(engine: Any, options: ServerOptions | None = None, model_name: str | None = None,
               stepper: Callable[[], Stepper] | None = None) -> FastAPI:
    """An app serving `engine` (anything with the Engine contract); the worker runs while the app does.
    `stepper` makes the batch the worker steps (default: `batching.make_stepper(engine, options.max_batch)`,
    which refuses a batch whose KV cache does not fit: BudgetError)."""
    options = options or ServerOptions()
    metrics = ServerMetrics()
    metrics.max_queue = options.max_queue
    context = int(engine.max_context)
    worker = EngineWorker(engine, metrics, max_queue=options.max_queue, threads=options.threads,
                          max_batch=options.max_batch, stepper=stepper, prefill_chunk=options.prefill_chunk)
    state = ServerState(worker=worker,
                        encoder=PromptEncoder(engine), metrics=metrics, options=options,
                        model_name=model_name or engine.model_name, max_context=context, created=int(time.time()))
    max_prompt_chars = state.encoder.max_prompt_chars(context)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        log.info("serving model '%s' (context %d tokens; body limit %d bytes; batch %d; queue %d)",
                 state.model_name, state.max_context, options.body_limit(context), options.max_batch,
                 options.max_queue)
        try:
            yield
        finally:
            for task in state.shutdown_tasks:
                task.cancel()
            state.encoder.close()
            await asyncio.to_thread(state.worker.close)

    app = FastAPI(title="hybrimoe", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    # Added innermost first: metrics see every answer, the guard runs before CORS and the body is read.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=options.body_limit(context),
                       body_timeout=options.body_timeout)
    if options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])
    app.add_middleware(GuardMiddleware, options=options)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, endpoints=ENDPOINTS)

    def model_card() -> ModelCard:
        return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_context)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model_id:path}")  # ids such as "org/name" hold a slash
    async def get_model(model_id: str) -> JSONResponse:
        if model_id != state.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card().model_dump())

    async def serve(request: Request, schema: type, prepare_for: Callable, respond: Callable) -> Response:
        """Parse and check, take a place in the queue, tokenise, queue the job, answer whole or streamed."""
        req = await parse_body(request, schema)
        check_common(req, state.model_name)
        prepare = prepare_for(req, context, max_prompt_chars)  # may refuse a prompt that surely cannot fit
        try:
            ticket = state.worker.admit()
        except (QueueFull, Unavailable) as exc:
            raise admission_error(exc) from None
        try:
            prompt_ids, params = await state.encoder.run(prepare)
        except BaseException:
            ticket.release()
            raise
        try:
            running = await start_job(state.worker, lambda _engine: (prompt_ids, params), request, ticket)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await respond(running, state.model_name, req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatCompletionRequest, prepare_chat, chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, CompletionRequest, prepare_completion, completion_response)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if not state.worker.alive:
            raise APIError(503, "the engine worker is not running", type_="service_unavailable")
        if not state.worker.accepting:
            raise APIError(503, SHUTTING_DOWN, type_="service_unavailable", code="shutting_down")
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        metrics.engine_threads = state.worker.torch_threads
        text = metrics.render(state.worker.stats_snapshot(), state.model_name)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app
