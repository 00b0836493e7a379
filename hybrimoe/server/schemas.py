"""Request and response bodies of the OpenAI API subset that the server speaks.

Requests are validated strictly (a string where a number belongs is an error, not coerced). A field
is either honoured, or accepted because it changes nothing here (`IGNORED_FIELDS`: user, metadata,
store, ...), or refused with a 400 naming it (`hybrimoe.server.jobs.check_supported`): never silently
ignored. Responses mirror OpenAI's objects closely enough for the official `openai` client to parse them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from hybrimoe.engine.types import SEED_RANGE

CHAT_ROLES = ("system", "developer", "user", "assistant")


# OpenAI fields that do not change what is generated, accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                            "parallel_tool_calls"})


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Body(Request):
    """A request body: unknown fields are kept (`model_extra`) so that they can be refused by name."""

    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in CHAT_ROLES:
            raise ValueError(f"unsupported role {role!r}; accepted: {', '.join(CHAT_ROLES)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported; only 'text'")
        return content

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the chat template ("developer" is OpenAI's new name for system)."""
        content = self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(Request):
    include_usage: bool = False


class SamplingFields(Body):
    """Fields common to both endpoints."""

    model: str
    max_tokens: int | None = Field(default=None, description="tokens to generate; > 0")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int = Field(default=0, ge=0)  # not OpenAI's; vLLM's extension (0 = off)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    logprobs: bool | int | None = None  # refused when asked for: not implemented
    top_logprobs: int | None = None  # refused unless 0
    tools: list | None = None  # refused: no tool calling
    tool_choice: str | dict | None = None  # only "none"
    response_format: dict | None = None  # only {"type": "text"}: no JSON mode

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {value} for token {token}")
        return bias

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(token): float(value) for token, value in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        if len(items) > 4:
            raise ValueError(f"at most 4 stop strings are accepted, got {len(items)}")
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field that `requested_max_tokens` came from, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(SamplingFields):
    # A string, a one-element list of strings, or token ids; batches of prompts are not supported.
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None  # only 1
    suffix: str | None = None  # only empty
    max_tokens: int | None = 16  # OpenAI's default for completions

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None

    @field_serializer("delta")
    def _delta_without_nulls(self, delta: ChatDelta) -> dict[str, str]:
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """Both the whole response and each stream chunk (OpenAI uses one object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybrimoe"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo
