"""Bad requests to a real `hybrimoe serve` get a 4xx with an OpenAI-style error body, and the
server keeps serving: after each one a valid request still succeeds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_utils import ServerProcess, start_server

BODY_LIMIT = 16 * 1024
USER = [{"role": "user", "content": "hi"}]
TOO_LONG = "the quick brown fox " * 400  # far more tokens than the tiny model's 512-token context


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(tiny_checkpoint("qwen3-moe"), tmp_path_factory.mktemp("serve") / "serve.log",
                        "--max-body-bytes", str(BODY_LIMIT), "--served-model-name", "tiny")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api_url, timeout=120) as c:
        yield c


def chat(**fields: Any) -> dict:
    return {"model": "tiny", "messages": USER, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict:
    return {"model": "tiny", "prompt": "hello", "max_tokens": 2, **fields}


# (case id, path, body: dict -> JSON, bytes -> raw, expected status, expected `param` or ...)
CASES = [
    ("malformed-json", "/chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not-utf8", "/completions", b'\xff\xfe{"model"', 400, None),
    ("json-array", "/completions", b"[1, 2]", 400, None),
    ("json-nested-too-deep", "/completions", b'{"model": "tiny", "prompt": ' + b"[" * 5000, 400, None),
    ("unknown-model", "/chat/completions", chat(model="gpt-9"), 404, "model"),
    ("unknown-model-completions", "/completions", completion(model="gpt-9"), 404, "model"),
    ("max-tokens-string", "/chat/completions", chat(max_tokens="ten"), 400, "max_tokens"),
    ("messages-string", "/chat/completions", chat(messages="hi"), 400, "messages"),
    ("temperature-string", "/completions", completion(temperature="hot"), 400, "temperature"),
    ("stream-string", "/completions", completion(stream="yes"), 400, "stream"),
    ("prompt-number", "/completions", completion(prompt=3.5), 400, "prompt"),
    ("content-number", "/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages.0.content"),
    ("image-content", "/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages.0.content"),
    ("missing-messages", "/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("empty-messages", "/chat/completions", chat(messages=[]), 400, "messages"),
    ("missing-model", "/completions", {"prompt": "hi"}, 400, "model"),
    ("unsupported-role", "/chat/completions", chat(messages=[{"role": "tool", "content": "x"}]), 400,
     "messages.0.role"),
    ("max-tokens-zero", "/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("max-completion-tokens-zero", "/chat/completions", chat(max_completion_tokens=0), 400,
     "max_completion_tokens"),
    ("max-completion-tokens-past-context", "/chat/completions", chat(max_completion_tokens=100_000), 400,
     "max_completion_tokens"),
    ("max-tokens-negative", "/completions", completion(max_tokens=-3), 400, "max_tokens"),
    ("n-2", "/chat/completions", chat(n=2), 400, "n"),
    ("temperature-out-of-range", "/completions", completion(temperature=5), 400, "temperature"),
    ("top-p-zero", "/completions", completion(top_p=0), 400, "top_p"),
    ("seed-out-of-range", "/completions", completion(seed=2**70), 400, "seed"),
    ("empty-stop", "/completions", completion(stop=[""]), 400, "stop"),
    ("logprobs", "/chat/completions", chat(logprobs=True), 400, "logprobs"),
    ("tools", "/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("prompt-batch", "/completions", completion(prompt=["a", "b"]), 400, "prompt"),
    ("prompt-too-long", "/completions", completion(prompt=TOO_LONG), 400, "prompt"),
    ("chat-too-long", "/chat/completions", chat(messages=[{"role": "user", "content": TOO_LONG}]), 400,
     "messages"),
    ("max-tokens-past-context", "/completions", completion(max_tokens=100_000), 400, "max_tokens"),
    ("token-id-outside-vocab", "/completions", completion(prompt=[1, 2, 10**9]), 400, ...),
    ("streamed-too-long", "/chat/completions",
     chat(messages=[{"role": "user", "content": TOO_LONG}], stream=True), 400, "messages"),
]


def check_error(response: httpx.Response, status: int, param: Any = ...) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not ...:
        assert error["param"] == param
    return error


def still_serving(http: httpx.Client) -> None:
    response = http.post("/completions", json=completion(temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx_and_server_keeps_serving(http: httpx.Client, case: tuple) -> None:
    _, path, body, status, param = case
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    check_error(response, status, param)
    still_serving(http)


def test_unknown_path_and_method(http: httpx.Client) -> None:
    check_error(http.get("/nothing-here"), 404)
    check_error(http.delete("/models"), 405)
    still_serving(http)


def test_oversized_body_declared_and_streamed(http: httpx.Client) -> None:
    big = json.dumps(completion(prompt="x" * (2 * BODY_LIMIT))).encode()
    error = check_error(http.post("/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert error["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the size is only known while reading
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    check_error(http.post("/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
    # Just under the limit is accepted (and then fails only for being too long a prompt).
    fits = json.dumps(completion(prompt="x " * (BODY_LIMIT // 2 - 100))).encode()
    assert len(fits) <= BODY_LIMIT
    check_error(http.post("/completions", content=fits, headers={"content-type": "application/json"}), 400, "prompt")
    still_serving(http)


def test_openai_client_raises_typed_errors(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120) as client:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=USER)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=0)
        assert info.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=TOO_LONG, stream=True)
        ok = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0)
        assert ok.model == "tiny" and ok.usage.completion_tokens == 2
