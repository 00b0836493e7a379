"""From an HTTP body to (prompt ids, SamplingParams): parsing, field checks, and the prepare step that
tokenises and sizes a request (run on the tokenizer pool, `hybrimoe.server.encoding`).

Every check that can refuse a request runs before it takes a place in the engine's queue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from hybrimoe.engine.types import SamplingParams
from hybrimoe.errors import HybrimoeError
from hybrimoe.server.errors import APIError, from_validation_error
from hybrimoe.server.schemas import IGNORED_FIELDS, ChatCompletionRequest, CompletionRequest

RequestModel = TypeVar("RequestModel", bound=BaseModel)
AnyRequest = ChatCompletionRequest | CompletionRequest
PrepareFn = Callable[[Any], tuple[list[int], SamplingParams]]  # engine view -> (prompt ids, params)


async def parse_body(request: Request, model: type[RequestModel]) -> RequestModel:
    """The JSON body validated as `model`; 400 for malformed JSON, a non-object, invalid Unicode or a wrong field."""
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
    bad = _invalid_unicode(data)
    if bad is not None:
        raise APIError(400, f"'{bad}' holds invalid Unicode (a lone UTF-16 surrogate such as \\ud800)",
                       param=bad, code="invalid_unicode")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _invalid_unicode(value: Any, path: str = "") -> str | None:
    """Dotted path of the first string (value or key) that is not encodable as UTF-8, or None."""
    if isinstance(value, str):
        return None if _encodable(value) else path or "(body)"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not _encodable(key):
                return path or "(body)"
            found = _invalid_unicode(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _invalid_unicode(item, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_common(req: AnyRequest, model_name: str) -> None:
    """Checks that need no tokenizer: model name, n, max_tokens, unsupported features."""
    max_tokens = req.requested_max_tokens
    if req.model != model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported: this server returns exactly one choice (n=1)",
                       param="n", code="unsupported_value")
    check_supported(req)
    if max_tokens is not None and max_tokens <= 0:
        param = req.max_tokens_param
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param,
                       code="invalid_value")


def _unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"{param}: {what} is not supported by this server", param=param, code="unsupported_value")


def check_supported(req: AnyRequest) -> None:
    """400 naming the first field that asks for something this server does not do."""
    if req.logprobs:
        raise _unsupported("logprobs", "logprobs")
    if req.top_logprobs:
        raise _unsupported("top_logprobs", "top_logprobs")
    if req.tools:
        raise _unsupported("tools", "tools (function calling)")
    if req.tool_choice not in (None, "none"):
        raise _unsupported("tool_choice", f"tool_choice {req.tool_choice!r} (only 'none')")
    if req.response_format is not None and req.response_format.get("type") != "text":
        kind = req.response_format.get("type")
        raise _unsupported("response_format", f"response_format {kind!r} (JSON mode, structured output; only 'text')")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise _unsupported("echo", "echo=true")
        if req.best_of not in (None, 1):
            raise _unsupported("best_of", f"best_of={req.best_of} (only 1)")
        if req.suffix:
            raise _unsupported("suffix", "suffix (insertion)")
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED_FIELDS or value is None or (name == "modalities" and value == ["text"]):
            continue
        raise APIError(400, f"unsupported parameter '{name}': this server does not implement it (remove it, "
                            "or send null)", param=name, code="unsupported_parameter")


def check_prompt_chars(chars: int, context: int, max_prompt_chars: int | None, param: str) -> None:
    """A prompt longer in characters than any context-full of tokens spans: refused without tokenising."""
    if max_prompt_chars is not None and chars > max_prompt_chars:
        raise _too_long(context, 0, param, f"{chars} characters, more than any {context - 1} tokens span")


def prepare_chat(req: ChatCompletionRequest, context: int, max_prompt_chars: int | None) -> PrepareFn:
    """The prepare step of a chat request (APIError now if the prompt surely cannot fit)."""
    messages = [m.as_template_message() for m in req.messages]
    check_prompt_chars(sum(len(m["content"]) for m in messages), context, max_prompt_chars, "messages")
    return _prepare(lambda engine: engine.encode_chat(messages), req, "messages")


def prepare_completion(req: CompletionRequest, context: int, max_prompt_chars: int | None) -> PrepareFn:
    """The prepare step of a completion request (APIError now if the prompt surely cannot fit)."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"a batch of {len(prompt)} prompts is not supported; send one prompt",
                           param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        text = prompt
        check_prompt_chars(len(text), context, max_prompt_chars, "prompt")
        return _prepare(lambda engine: engine.encode(text), req, "prompt")
    ids = list(prompt)
    return _prepare(lambda engine: ids, req, "prompt")


def _too_long(context: int, tokens: int, param: str, detail: str = "") -> APIError:
    return APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                         f"{detail or f'{tokens} tokens'} (at most {context - 1} fit)",
                    param=param, code="context_length_exceeded")


def _prepare(encode: Callable[[Any], list[int]], req: AnyRequest, prompt_param: str) -> PrepareFn:
    """Tokenise and size the request (on a tokenizer thread); APIError for what cannot run."""
    max_tokens = req.requested_max_tokens

    def prepare(engine: Any) -> tuple[list[int], SamplingParams]:
        context = int(engine.max_context)
        try:
            ids = encode(engine)
        except HybrimoeError as exc:  # e.g. PromptError: a chat the model's template refuses
            raise APIError(400, f"cannot build the prompt: {exc}", param=prompt_param) from None
        if not ids:
            raise APIError(400, "the prompt is empty", param=prompt_param, code="invalid_value")
        if len(ids) > context - 1:
            raise _too_long(context, len(ids), prompt_param)
        room = context - len(ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but "
                                f"{len(ids) + max_tokens} were requested ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion); lower {req.max_tokens_param} to at "
                                f"most {room}", param=req.max_tokens_param, code="context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens or room, temperature=req.temperature,
                                top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop_strings=req.stop_strings,
                                frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                logit_bias=req.token_bias)
        try:
            params.validate()
        except HybrimoeError as exc:
            raise APIError(400, str(exc)) from None
        return ids, params

    return prepare
