"""Failure paths and admission, in process: an engine exception is a 500 `server_error` (or a final
error event once streaming), NaN logits a clear 500, a dead worker makes /health and requests 503, a
closed worker 503; a full queue 429 with Retry-After while admitted requests complete; shutdown
drains (503 for the queued, the running one finishes within its grace or ends with an error event)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from server_fakes import Crash, fake_engine, openai_client, served
from test_server_worker import GatedEngine


BODY = {"model": "fake", "prompt": "hello world", "max_tokens": 6, "temperature": 0}


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded ("[DONE]" kept as a string)."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("fail_at", [0, 3], ids=["prefill", "decode"])
def test_an_engine_exception_is_a_500_server_error(fail_at: int) -> None:
    with served(fake_engine(fail_at=fail_at, error=RuntimeError("kernel exploded"))) as http:
        whole = http.post("/v1/completions", json=BODY)
        assert whole.status_code == 500, whole.text
        error = whole.json()["error"]
        assert error["type"] == "server_error" and "kernel exploded" in error["message"]
        with pytest.raises(openai.InternalServerError):
            openai_client(http).completions.create(**BODY)
        assert http.get("/health").status_code == 200  # one failure does not take the server down


def test_an_engine_exception_mid_stream_ends_with_an_error_event() -> None:
    with served(fake_engine(fail_at=3, error=RuntimeError("kernel exploded"))) as http:
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
        response = http.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200  # the stream had started
        events = sse_events(response)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "server_error" and "kernel exploded" in events[-2]["error"]["message"]
        texts = [e for e in events[:-2] if isinstance(e, dict) and "choices" in e]
        assert texts and not any(c["finish_reason"] for e in texts for c in e["choices"])


def test_nan_logits_are_a_clear_500() -> None:
    with served(fake_engine(fail_at=0, error=None)) as http:
        error = http.post("/v1/completions", json=BODY).json()["error"]
        assert error["type"] == "server_error" and "non-finite logits" in error["message"]


def test_a_dead_worker_makes_health_and_requests_503() -> None:
    with served(fake_engine(fail_at=0, error=Crash("thread killed"))) as http:
        dying = http.post("/v1/completions", json=BODY)
        assert dying.status_code == 503 and dying.json()["error"]["type"] == "service_unavailable"
        for _ in range(100):
            if http.get("/health").status_code == 503:
                break
            time.sleep(0.02)
        assert http.get("/health").status_code == 503
        after = http.post("/v1/completions", json=BODY)
        assert after.status_code == 503 and "not running" in after.json()["error"]["message"]


def test_a_request_after_the_worker_closed_gets_503() -> None:
    with served() as http:
        assert http.post("/v1/completions", json=BODY).status_code == 200
        http.app.state.server.worker.close()
        closed = http.post("/v1/completions", json=BODY)
        assert closed.status_code == 503 and closed.json()["error"]["type"] == "service_unavailable"
        assert http.get("/health").status_code == 503


def _gated_server(**options):
    engine = GatedEngine()
    return engine, served(engine, **options)


def test_a_full_queue_gets_429_while_admitted_requests_complete() -> None:
    engine, server = _gated_server(max_queue=2)
    body = {"model": "gated", "prompt": [1, 2, 3], "max_tokens": 4}
    with server as http:
        results: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            results[i] = http.post("/v1/completions", json=body)

        state = http.app.state.server
        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:  # one runs (waiting for its tokens), two wait in the queue
            t.start()
            deadline = time.monotonic() + 10
            while state.metrics.queue_depth + state.metrics.running < threads.index(t) + 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert state.metrics.running == 1 and state.metrics.queue_depth == 2
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
        engine.release(3 * 3)
        for t in threads:
            t.join(10)
        done = [results[i].json() for i in range(3)]
        assert [(d["usage"]["completion_tokens"], d["choices"][0]["finish_reason"]) for d in done] == [(4, "length")] * 3
        metrics = http.get("/metrics").text
        assert 'hybrimoe_server_rejected_requests_total{reason="queue_full"} 1' in metrics
        assert "hybrimoe_server_max_queue 2" in metrics and "hybrimoe_server_queue_depth 0" in metrics


@pytest.mark.parametrize("finishes", [True, False], ids=["within-grace", "past-grace"])
def test_shutdown_refuses_the_queued_and_gives_the_running_one_its_grace(finishes: bool) -> None:
    engine, server = _gated_server(shutdown_timeout=1.0)
    body = {"model": "gated", "prompt": [1, 2, 3], "max_tokens": 4, "stream": True}
    with server as http:
        state = http.app.state.server
        results: dict[str, httpx.Response] = {}
        running = threading.Thread(target=lambda: results.update(running=http.post("/v1/completions", json=body)))
        running.start()
        while state.metrics.running < 1:
            time.sleep(0.01)
        queued = threading.Thread(target=lambda: results.update(queued=http.post("/v1/completions", json=body)))
        queued.start()
        while state.metrics.queue_depth < 1:
            time.sleep(0.01)
        http.portal.call(state.begin_shutdown)  # what SIGTERM does (runner.GracefulServer), on the loop
        queued.join(10)
        assert results["queued"].status_code == 503 and results["queued"].json()["error"]["code"] == "shutting_down"
        assert http.post("/v1/completions", json=body).status_code == 503
        assert http.get("/health").status_code == 503
        if finishes:
            engine.release(3)
        running.join(10)
        events = sse_events(results["running"])
        assert events[-1] == "[DONE]"
        if finishes:
            assert events[-2]["choices"][0]["finish_reason"] == "length"
        else:
            assert events[-2]["error"]["code"] == "shutting_down"
            engine.release(3)  # the worker, stopped after its current token, can now notice and end

