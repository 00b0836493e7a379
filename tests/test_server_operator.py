"""`hybrimoe serve` as an operator runs it (a real subprocess on a tiny checkpoint, the official `openai`
client and raw HTTP): a burst beyond --max-queue gets 429s while the admitted requests get their own
tokens; API keys (flag and environment); a cross-site POST refused; a 3.9 MB prompt refused without
delaying a short request; slow bodies and headers timed out; --threads reaches the engine thread."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_utils import ServerProcess, start_server

CONTEXT = 4096
KEY, ENV_KEY = "sk-flag-key", "sk-env-key"
MAX_QUEUE = 2
TIMEOUT = 2  # --body-timeout and --header-timeout, seconds


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3-moe", overrides={"max_position_embeddings": CONTEXT})


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory) -> ServerProcess:
    proc = start_server(model_dir, tmp_path_factory.mktemp("serve") / "serve.log", "--api-key", KEY,
                        "--max-queue", str(MAX_QUEUE), "--max-body-bytes", str(4 * 1024 * 1024),
                        "--body-timeout", str(TIMEOUT), "--header-timeout", str(TIMEOUT), "--threads", "1",
                        env={"HYBRIMOE_API_KEYS": f"{ENV_KEY}, sk-other"})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.api_url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(model_dir: Path) -> str:
    return model_dir.resolve().name


def metrics(server: ServerProcess) -> str:
    return httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text


def test_a_burst_beyond_max_queue_gets_429_while_admitted_requests_complete(
        server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    prompts = [f"Request number {i} asks about {w}" for i, w in enumerate("abcdefghijkl")]
    alone = [client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]
    barrier = threading.Barrier(len(prompts))
    outcome: list[object] = [None] * len(prompts)

    def one(i: int) -> None:
        barrier.wait(30)
        try:
            outcome[i] = client.completions.create(model=model, prompt=prompts[i], max_tokens=24,
                                                   temperature=0).choices[0].text
        except openai.RateLimitError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [o for o in outcome if isinstance(o, openai.RateLimitError)]
    accepted = [(i, o) for i, o in enumerate(outcome) if isinstance(o, str)]
    assert len(accepted) >= MAX_QUEUE + 1 and refused, outcome
    assert all(text == alone[i] for i, text in accepted)
    for exc in refused:
        assert exc.status_code == 429 and exc.body["code"] == "queue_full"
        assert int(exc.response.headers["retry-after"]) >= 1
    text = metrics(server)
    assert f'hybrimoe_server_rejected_requests_total{{reason="queue_full"}} {len(refused)}' in text
    assert f"hybrimoe_server_max_queue {MAX_QUEUE}" in text and "hybrimoe_server_queue_depth 0" in text


def test_keys_from_the_flag_and_the_environment(server: ServerProcess, model: str) -> None:
    for key in (KEY, ENV_KEY, "sk-other"):
        with openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0) as c:
            assert c.models.list().data[0].id == model
    with openai.OpenAI(base_url=server.api_url, api_key="sk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.completions.create(model=model, prompt="hi", max_tokens=2)
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    assert httpx.get(server.base_url + "/metrics", timeout=30).status_code == 401


def test_a_cross_site_post_is_refused(server: ServerProcess, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2})
    for headers, status in (({"Origin": "http://evil.example", "Content-Type": "text/plain",
                              "Authorization": f"Bearer {KEY}"}, 403),
                            ({"Host": "evil.example", "Content-Type": "text/plain"}, 403),
                            ({"Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"}, 415)):
        response = httpx.post(server.api_url + "/completions", content=body, headers=headers, timeout=30)
        assert response.status_code == status, (headers, response.text)


def test_a_huge_prompt_is_refused_without_delaying_a_short_request(server: ServerProcess, client: openai.OpenAI,
                                                                  model: str) -> None:
    def short() -> float:
        start = time.perf_counter()
        client.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
        return time.perf_counter() - start

    baseline = statistics.median(short() for _ in range(3))
    rss_before = server.rss_bytes()
    huge = "the quick brown fox " * (3_900_000 // 20)  # 3.9 MB, under the 4 MiB body limit
    errors: list[dict] = []

    def send_huge() -> None:
        response = httpx.post(server.api_url + "/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": model, "prompt": huge, "max_tokens": 2})
        errors.append(response.json()["error"])

    big = [threading.Thread(target=send_huge) for _ in range(4)]
    for t in big:
        t.start()
    during = short()
    for t in big:
        t.join(120)
    assert [e["code"] for e in errors] == ["context_length_exceeded"] * 4 and errors[0]["param"] == "prompt"
    assert during < baseline + 1.0, (during, baseline)
    assert server.rss_bytes() - rss_before < 300e6


def _raw(server: ServerProcess) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT + 10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_bodies_and_headers_are_cut_off(server: ServerProcess) -> None:
    start = time.monotonic()
    with _raw(server) as sock:  # a body that never finishes: 408, then the connection closes
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    with _raw(server) as sock:  # headers that never finish: the connection closes
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _read_all(sock) == b""
    assert time.monotonic() - start < 2 * TIMEOUT + 8
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_threads_flag_reaches_the_engine_thread(server: ServerProcess) -> None:
    assert "hybrimoe_server_engine_threads 1" in metrics(server)
