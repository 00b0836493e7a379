"""From a validated request to a running job: body parsing, request checks, the worker-side build
step, and the event stream of one job raced against the client's disconnect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from hybrimoe.engine.types import SamplingParams, StreamChunk
from hybrimoe.errors import HybrimoeError
from hybrimoe.server.errors import APIError, from_validation_error
from hybrimoe.server.schemas import ChatCompletionRequest, CompletionRequest
from hybrimoe.server.worker import BuildFn, EngineWorker, Failed, Finished, Job, Started

RequestModel = TypeVar("RequestModel", bound=BaseModel)


class ClientGone(Exception):
    """The client disconnected while its request was queued or running."""


async def parse_body(request: Request, model: type[RequestModel]) -> RequestModel:
    """The JSON body validated as `model`; 400 for malformed JSON, a non-object or a wrong field."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON arrays or objects too deeply",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def check_common(req: ChatCompletionRequest | CompletionRequest, model_name: str) -> None:
    """Checks that need no tokenizer: model name, n, max_tokens."""
    max_tokens = req.requested_max_tokens
    if req.model != model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported: this server returns exactly one choice (n=1)",
                       param="n", code="unsupported_value")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    if req.tools:
        raise APIError(400, "tools (function calling) are not supported", param="tools", code="unsupported_value")
    if max_tokens is not None and max_tokens <= 0:
        param = req.max_tokens_param
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param,
                       code="invalid_value")


def chat_build(req: ChatCompletionRequest) -> BuildFn:
    messages = [m.as_template_message() for m in req.messages]
    return _build(lambda engine: engine.encode_chat(messages), req, "messages")


def completion_build(req: CompletionRequest) -> BuildFn:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"a batch of {len(prompt)} prompts is not supported; send one prompt",
                           param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if req.echo:
        raise APIError(400, "echo=true is not supported", param="echo", code="unsupported_value")
    if isinstance(prompt, str):
        text = prompt
        return _build(lambda engine: engine.encode(text), req, "prompt")
    ids = list(prompt)
    return _build(lambda engine: ids, req, "prompt")


def _build(encode: Callable[[Any], list[int]], req: ChatCompletionRequest | CompletionRequest,
           prompt_param: str) -> BuildFn:
    """Worker-side step: tokenise (the tokenizer belongs to the engine thread) and size the request."""
    max_tokens = req.requested_max_tokens

    def build(engine: Any) -> tuple[list[int], SamplingParams]:
        try:
            ids = encode(engine)
        except HybrimoeError as exc:  # e.g. PromptError: a chat the model's template refuses
            raise APIError(400, f"cannot build the prompt: {exc}", param=prompt_param) from None
        context = int(engine.max_context)
        if not ids:
            raise APIError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
        if len(ids) > context - 1:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt "
                                f"has {len(ids)} tokens (at most {context - 1} fit)",
                           param=prompt_param, code="context_length_exceeded")
        room = context - len(ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but "
                                f"{len(ids) + max_tokens} were requested ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion); lower {req.max_tokens_param} to at "
                                f"most {room}", param=req.max_tokens_param, code="context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens or room, temperature=req.temperature,
                                top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop_strings=req.stop_strings)
        try:
            params.validate()
        except HybrimoeError as exc:
            raise APIError(400, str(exc)) from None
        return ids, params

    return build


def rejection(error: BaseException) -> APIError:
    """The API error for what a job's build step or the engine raised."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, HybrimoeError):
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type_="server_error")


@dataclass
class RunningJob:
    """An accepted job and the task that notices its client leaving (and then cancels the job)."""

    job: Job
    started: Started
    watcher: asyncio.Task

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        """The job's chunks until it finishes; raises ClientGone or the job's APIError."""
        while True:
            event = await _next_or_gone(self.job, self.watcher)
            if isinstance(event, Finished):
                return
            if isinstance(event, Failed):
                raise rejection(event.error)
            assert isinstance(event, StreamChunk), event
            yield event

    def close(self) -> None:
        """Release the engine (no-op if the job is over) and stop watching the client."""
        self.job.cancel()
        self.watcher.cancel()


async def start_job(worker: EngineWorker, build: BuildFn, request: Request) -> RunningJob:
    """Queue the request and wait until the engine accepts it (first token ready) or rejects it."""
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        job = worker.submit(build, asyncio.get_running_loop())
    except RuntimeError as exc:
        watcher.cancel()
        raise APIError(503, str(exc), type_="service_unavailable") from None

    def client_left(task: asyncio.Task) -> None:
        # Frees the engine even if no response code runs again (a stream whose body iterator never
        # started, because the disconnect was noticed first, never reaches its `finally`).
        if not task.cancelled():
            job.cancel()

    watcher.add_done_callback(client_left)
    try:
        event = await _next_or_gone(job, watcher)
        if isinstance(event, Failed):
            raise rejection(event.error)
        if not isinstance(event, Started):
            raise APIError(500, f"unexpected first event {type(event).__name__}", type_="server_error")
    except BaseException:
        job.cancel()
        watcher.cancel()
        raise
    return RunningJob(job=job, started=event, watcher=watcher)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read before this starts)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_or_gone(job: Job, watcher: asyncio.Task) -> Any:
    if job.events.qsize():
        return job.events.get_nowait()
    getter = asyncio.ensure_future(job.next_event())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise ClientGone()
