"""OpenAI response objects from a running job: whole (stream=false) or as Server-Sent Events.

A stream is `data: <chunk JSON>` events ending with `data: [DONE]`. Chat streams open with a delta
that carries the role, send text deltas, then an empty delta with `finish_reason`; with
`stream_options.include_usage` a last chunk with no choices carries the usage. An error after the
stream has started is sent as a `data: {"error": ...}` event before `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from hybrimoe.engine.types import GenerationResult
from hybrimoe.server.errors import APIError
from hybrimoe.server.jobs import ClientGone, RunningJob
from hybrimoe.server.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    Usage,
)

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


def usage_of(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


async def collect(running: RunningJob) -> GenerationResult:
    """Run a job to the end and return its result (stream=false)."""
    result = None
    try:
        async for chunk in running.chunks():
            result = chunk.result or result
    finally:
        running.close()
    if result is None:
        raise APIError(500, "generation ended without a result", type_="server_error")
    return result


async def chat_response(running: RunningJob, model: str, stream: bool, include_usage: bool) -> Response:
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if stream:
        def chunk(delta: ChatDelta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

        def usage_chunk(usage: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)

        opening = chunk(ChatDelta(role="assistant", content=""))
        events = _sse(running, opening, lambda text: chunk(ChatDelta(content=text)),
                      lambda finish: chunk(ChatDelta(), finish), usage_chunk if include_usage else None)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        result = await collect(running)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = ChatCompletion(id=rid, created=created, model=model, usage=usage_of(result),
                          choices=[ChatChoice(message=ChatMessageOut(content=result.text),
                                              finish_reason=result.finish_reason)])
    return JSONResponse(body.model_dump())


async def completion_response(running: RunningJob, model: str, stream: bool, include_usage: bool) -> Response:
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if stream:
        def chunk(text: str, finish: str | None = None) -> Completion:
            return Completion(id=rid, created=created, model=model,
                              choices=[CompletionChoice(text=text, finish_reason=finish)])

        def usage_chunk(usage: Usage) -> Completion:
            return Completion(id=rid, created=created, model=model, choices=[], usage=usage)

        events = _sse(running, None, chunk, lambda finish: chunk("", finish),
                      usage_chunk if include_usage else None)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    try:
        result = await collect(running)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = Completion(id=rid, created=created, model=model, usage=usage_of(result),
                      choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)])
    return JSONResponse(body.model_dump())


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _sse(running: RunningJob, opening: BaseModel | None, text_chunk: Callable[[str], BaseModel],
               finish_chunk: Callable[[str], BaseModel],
               usage_chunk: Callable[[Usage], BaseModel] | None) -> AsyncIterator[str]:
    """The SSE events of one job; the engine is released however the stream ends."""
    try:
        if opening is not None:
            yield _event(opening)
        async for chunk in running.chunks():
            if chunk.text:
                yield _event(text_chunk(chunk.text))
            if chunk.result is not None:
                yield _event(finish_chunk(chunk.result.finish_reason))
                if usage_chunk is not None:
                    yield _event(usage_chunk(usage_of(chunk.result)))
        yield "data: [DONE]\n\n"
    except ClientGone:
        log.info("client disconnected mid-stream")
    except APIError as exc:
        yield _event(exc.body())
        yield "data: [DONE]\n\n"
    finally:  # also on cancellation, when the server notices the disconnect first
        running.close()
