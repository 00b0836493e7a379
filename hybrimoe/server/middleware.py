"""Pure ASGI middleware (responses are not buffered, so streams flow).

`BodyLimitMiddleware` refuses request bodies over a size limit with 413, and bodies not received
within `body_timeout` seconds with 408 (a client that never finishes its body holds nothing for long).
A declared `Content-Length` over the limit is refused before the body is read; a body without one
(chunked) is counted as it streams. Requests within the limit get their body buffered and replayed
to the app, which then reads it as usual.

`RequestMetricsMiddleware` counts requests by endpoint and status and times them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hybrimoe.server.errors import APIError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, receive, declared, drain=declared <= DRAIN_LIMIT_BYTES)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                error = APIError(408, f"the request body was not received within {self.body_timeout:g} s "
                                      f"({size} bytes arrived; serve --body-timeout)", code="request_timeout")
                await _send_error(send, error, close=True)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                more = message.get("more_body", False)
                await self._refuse(send, receive, None, drain=more)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send, receive: Receive, declared: int | None, drain: bool) -> None:
        drained = not drain
        if drain:  # let the client finish sending, so it reads our answer instead of a reset
            read = 0
            deadline = time.monotonic() + self.body_timeout
            try:
                while read <= DRAIN_LIMIT_BYTES:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    if message["type"] != "http.request":
                        break
                    read += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        drained = True
                        break
            except asyncio.TimeoutError:
                pass
        size = f"{declared} bytes" if declared is not None else "more"
        error = APIError(413, f"request body is too large ({size}); the limit is "
                              f"{self.max_body_bytes} bytes (serve --max-body-bytes)",
                         code="request_too_large")
        await _send_error(send, error, close=not drained)


async def _send_error(send: Send, error: APIError, close: bool) -> None:
    """An OpenAI-style error response; `close`: the body was not (wholly) read, so the connection ends."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that returns the buffered body once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint and status, and times it to the end of its body."""

    def __init__(self, app: ASGIApp, metrics: Any, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        start = time.perf_counter()
        status = 499  # until a response starts: a client that left first
        started = recorded = False

        async def counting_send(message: Message) -> None:
            nonlocal status, started, recorded
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not recorded:
                recorded = True  # counted before the client can see the end of the response
                self.metrics.request_done(endpoint, status, time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # Unhandled errors pass through here: their 500 is sent by Starlette's outermost
            # ServerErrorMiddleware, which is where the app's `Exception` handler lives.
            if not started:
                status = 500
            raise
        finally:
            if not recorded:
                self.metrics.request_done(endpoint, status, time.perf_counter() - start)
