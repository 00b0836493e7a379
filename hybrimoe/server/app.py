"""The FastAPI application: OpenAI-compatible endpoints over one Engine.

    HTTP ─► BodyLimit ─► handler: parse + check ─► EngineWorker queue ─► engine thread
                                   ◄── events (asyncio.Queue) ◄── tokens, one request at a time

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from hybrimoe.server import DEFAULT_MAX_BODY_BYTES
from hybrimoe.server.errors import APIError, install_error_handlers
from hybrimoe.server.jobs import ClientGone, chat_build, check_common, completion_build, parse_body, start_job
from hybrimoe.server.metrics import CONTENT_TYPE, ServerMetrics
from hybrimoe.server.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from hybrimoe.server.responses import CLIENT_CLOSED_REQUEST, chat_response, completion_response
from hybrimoe.server.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from hybrimoe.server.worker import EngineWorker

log = logging.getLogger(__name__)

ENDPOINTS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"})


@dataclass
class ServerState:
    worker: EngineWorker
    metrics: ServerMetrics
    model_name: str
    max_context: int
    created: int


def create_app(engine: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_name: str | None = None) -> FastAPI:
    """An app serving `engine` (anything with the Engine contract); the worker runs while the app does."""
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    metrics = ServerMetrics()
    state = ServerState(worker=EngineWorker(engine, metrics), metrics=metrics,
                        model_name=model_name or engine.model_name, max_context=int(engine.max_context),
                        created=int(time.time()))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        log.info("serving model '%s' (context %d tokens)", state.model_name, state.max_context)
        try:
            yield
        finally:
            await asyncio.to_thread(state.worker.close)

    app = FastAPI(title="hybrimoe", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
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

    async def serve(request: Request, schema: type, build_for: Callable, respond: Callable) -> Response:
        """Parse and check, queue the job, then answer whole or as a stream."""
        req = await parse_body(request, schema)
        check_common(req, state.model_name)
        build = build_for(req)
        try:
            running = await start_job(state.worker, build, request)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await respond(running, state.model_name, req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatCompletionRequest, chat_build, chat_response)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, CompletionRequest, completion_build, completion_response)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.worker.alive:
            raise APIError(503, "the engine worker is not running", type_="service_unavailable")
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        text = metrics.render(state.worker.stats_snapshot(), state.model_name)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app
