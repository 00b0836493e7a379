"""SIGTERM to a real `hybrimoe serve` with one stream running and requests queued: the queued ones get
503, the stream ends with an error event after --shutdown-timeout, the process exits 0, no traceback."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
from server_utils import start_server

CONTEXT = 4096
GRACE = 1.0  # --shutdown-timeout


def test_sigterm_during_a_stream_exits_0_and_ends_the_stream_with_an_error_event(tiny_checkpoint, tmp_path) -> None:
    model_dir: Path = tiny_checkpoint("qwen3-moe", overrides={"max_position_embeddings": CONTEXT})
    server = start_server(model_dir, tmp_path / "serve.log", "--shutdown-timeout", str(GRACE))
    model = model_dir.resolve().name
    try:
        queued: list[httpx.Response] = []

        def queue_one() -> None:
            queued.append(httpx.post(server.api_url + "/completions", timeout=60,
                                     json={"model": model, "prompt": "queued", "max_tokens": 4}))

        body = {"model": model, "prompt": "The quick brown fox", "max_tokens": CONTEXT - 100, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", server.api_url + "/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            waiting = [threading.Thread(target=queue_one) for _ in range(3)]
            for t in waiting:
                t.start()
            deadline = time.monotonic() + 30
            while "hybrimoe_server_queue_depth 3" not in httpx.get(server.base_url + "/metrics").text:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.05)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
            ended = time.monotonic() - signalled
        for t in waiting:
            t.join(30)
        assert server.proc.wait(30) == 0
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert GRACE - 0.2 <= ended < GRACE + 5, ended  # the running stream had its grace period
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
        assert [(r.status_code, r.json()["error"]["code"]) for r in queued] == [(503, "shutting_down")] * 3
        log = server.log_path.read_text()
        assert "Traceback" not in log and "shutting down: 3 queued request(s) refused" in log
    finally:
        server.stop()
