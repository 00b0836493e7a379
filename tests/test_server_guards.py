"""Who may use the server and what it accepts, in process (the real app over a fake model): API keys,
Host / Origin checks and CORS, JSON-only bodies, fields honoured or refused by name, invalid Unicode,
405 with Allow, HEAD /health."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_fakes import fake_engine, openai_client, served

from hybrimoe.engine.types import SamplingParams

BODY = {"model": "fake", "prompt": "hello world", "max_tokens": 3, "temperature": 0}


def post(http, path: str = "/v1/completions", body: dict | bytes = BODY, **headers: str) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=raw, headers={"content-type": "application/json", **headers})


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_api_keys_guard_the_api_but_not_health() -> None:
    with served(api_keys=("key-one", "key-two")) as http:
        for key in ("key-one", "key-two"):
            assert openai_client(http, key).completions.create(**BODY).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError) as info:
            openai_client(http, "key-three").completions.create(**BODY)
        assert info.value.body["code"] == "invalid_api_key"
        missing = http.post("/v1/completions", json=BODY)
        assert error_of(missing, 401)["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert post(http, Authorization="Basic key-one").status_code == 401
        assert post(http, Authorization="Bearer key-one-and-more").status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer key-two"}).status_code == 200
        assert http.get("/health").status_code == 200
    with served() as http:  # no keys: open
        assert post(http).status_code == 200


def test_cross_site_requests_are_refused_on_loopback() -> None:
    with served() as http:
        # A page on another site posting a "simple" request (no preflight) to the local server.
        text_plain = http.post("/v1/completions", content=json.dumps(BODY),
                               headers={"content-type": "text/plain", "origin": "http://evil.example"})
        assert error_of(text_plain, 403)["code"] == "origin_not_allowed"
        # DNS rebinding: the browser sends the attacker's host name.
        rebound = post(http, host="evil.example:8000")
        assert error_of(rebound, 403)["code"] == "host_not_allowed"
        # Without an Origin (curl, SDKs) a non-JSON body is still refused: 415.
        plain = http.post("/v1/completions", content=json.dumps(BODY), headers={"content-type": "text/plain"})
        assert error_of(plain, 415)["code"] == "unsupported_media_type"
        form = http.post("/v1/completions", data={"model": "fake"})
        assert form.status_code == 415
        assert post(http, origin="http://evil.example").status_code == 403
        assert post(http, origin="http://127.0.0.1").status_code == 200  # same origin
        assert post(http, host="localhost:8000").status_code == 200
        assert post(http, **{"content-type": "application/json; charset=utf-8"}).status_code == 200
        assert "access-control-allow-origin" not in post(http).headers  # no CORS unless asked for


def test_allowed_hosts_and_origins_widen_and_turn_on_cors() -> None:
    site = "https://app.example"
    with served(allowed_hosts=("models.lan",), allowed_origins=(site,)) as http:
        assert post(http, host="models.lan").status_code == 200
        assert post(http, host="127.0.0.1").status_code == 403  # the list replaces the default
        preflight = http.options("/v1/completions", headers={
            "host": "models.lan", "origin": site, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == site
        answer = post(http, host="models.lan", origin=site)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == site
        assert post(http, host="models.lan", origin="https://other.example").status_code == 403
    with served(bind_host="0.0.0.0") as http:  # not loopback: any Host (use --api-key there)
        assert post(http, host="203.0.113.7:8000").status_code == 200


UNSUPPORTED = [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("tool_choice", "auto"),
    ("best_of", 2),
    ("suffix", "tail"),
    ("logprobs", 2),
    ("echo", True),
    ("functions", [{"name": "f"}]),
    ("repetition_penalty", 1.1),
    ("min_p", 0.1),
]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[f"{f}={v}" for f, v in UNSUPPORTED])
def test_unsupported_fields_are_refused_by_name(field: str, value: object) -> None:
    with served() as http:
        error = error_of(post(http, body={**BODY, field: value}), 400)
        assert error["param"] == field and field in error["message"]
        assert post(http).status_code == 200


def test_harmless_and_default_fields_are_accepted() -> None:
    with served() as http:
        extra = {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto",
                 "response_format": {"type": "text"}, "tool_choice": "none", "best_of": 1, "suffix": None,
                 "some_future_field": None}
        assert post(http, body={**BODY, **extra}).status_code == 200
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "response_format": {"type": "text"}, "parallel_tool_calls": True, "modalities": ["text"]}
        assert post(http, "/v1/chat/completions", chat).status_code == 200
        with pytest.raises(openai.BadRequestError) as info:
            openai_client(http).chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                        response_format={"type": "json_object"})
        assert info.value.body["param"] == "response_format"


def test_penalties_and_logit_bias_are_honoured() -> None:
    engine = fake_engine()
    prompt = engine.encode("hello world")
    with served(engine) as http:
        client = openai_client(http)
        forced = client.completions.create(model="fake", prompt=prompt, max_tokens=6, temperature=0,
                                           logit_bias={"7": 100})
        assert forced.usage.completion_tokens == 6
        assert engine.generate(prompt, SamplingParams(max_new_tokens=6, logit_bias={7: 100.0})).token_ids == [7] * 6
        assert forced.choices[0].text == engine.tokenizer.decode([7] * 6)
        plain = engine.generate(prompt, SamplingParams(max_new_tokens=24)).token_ids
        changed = 0
        for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -2.0},
                   {"frequency_penalty": -1.0, "presence_penalty": 0.5}):
            got = client.completions.create(model="fake", prompt=prompt, max_tokens=24, temperature=0, **kw)
            want = engine.generate(prompt, SamplingParams(max_new_tokens=24, **kw))
            assert got.choices[0].text == want.text, kw
            changed += want.token_ids != plain
        assert changed >= 2, "the penalties must change this model's greedy output"
        for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {"3": 101}}, {"frequency_penalty": 2.5},
                    {"logit_bias": {"99999": 1}}):
            error = error_of(post(http, body={**BODY, **bad}), 400)
            assert next(iter(bad)) in (error["param"] or "") + error["message"], error


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"model": "fake", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "fake\\udfff", "prompt": "hi", "max_tokens": 2}', "model"),
    ("/v1/chat/completions", b'{"model": "fake", "max_tokens": 2, "messages": [{"role": "user", '
                             b'"content": [{"type": "text", "text": "\\ud83d"}]}]}', "messages.0.content.0.text"),
    ("/v1/completions", b'{"model": "fake", "prompt": "hi", "stop": ["\\udc00"]}', "stop.0"),
])
def test_invalid_unicode_is_a_400_naming_the_field(path: str, body: bytes, param: str) -> None:
    # Raw JSON escapes: the official client refuses to encode a lone surrogate itself.
    with served() as http:
        error = error_of(post(http, path, body), 400)
        assert error["param"] == param and error["code"] == "invalid_unicode"
        assert post(http).status_code == 200
        # A valid surrogate pair is one character, and fine.
        pair = b'{"model": "fake", "prompt": "\\ud83d\\ude42", "max_tokens": 2}'
        assert post(http, body=pair).status_code == 200


def test_405_names_the_allowed_methods_and_health_answers_head() -> None:
    with served() as http:
        wrong = http.delete("/v1/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert error_of(wrong, 405)["type"] == "invalid_request_error"
        head = http.head("/health")
        assert head.status_code == 200 and head.content == b""


def test_the_default_body_limit_follows_the_context_length() -> None:
    from hybrimoe.server.options import BODY_BYTES_BASE, BODY_BYTES_PER_TOKEN

    limit = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * 64  # the fake model's context: 64 tokens
    with served() as http:
        padding = lambda size: {**BODY, "user": "x" * (size - len(json.dumps({**BODY, "user": ""})))}
        over = post(http, body=padding(limit + 1))
        assert error_of(over, 413)["code"] == "request_too_large" and str(limit) in error_of(over, 413)["message"]
        assert post(http, body=padding(limit)).status_code == 200
    with served(max_body_bytes=limit + 10) as http:  # --max-body-bytes overrides it
        assert post(http, body=padding(limit + 1)).status_code == 200
