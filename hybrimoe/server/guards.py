"""Who may drive the server: Host and Origin checks, API keys, JSON-only POST bodies (pure ASGI).

    Host not allowed            -> 403 host_not_allowed      (DNS rebinding: a page at evil.example that
                                                               resolves to 127.0.0.1 still sends its own Host)
    Origin not allowed          -> 403 origin_not_allowed    (cross-site requests from a browser)
    /v1/* or /metrics without a
    valid `Authorization: Bearer` key (when keys are set) -> 401 invalid_api_key
    POST that is not application/json -> 415 unsupported_media_type (no "simple" cross-site form posts)

/health stays open to all (still subject to the Host check). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from hybrimoe.server.errors import APIError
from hybrimoe.server.options import ServerOptions

Scope = dict[str, Any]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every key (no early exit that would time which one matched)."""
    given_bytes = given.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    return matched


def check_request(scope: Scope, options: ServerOptions) -> APIError | None:
    """The error a request gets before it reaches any endpoint, or None."""
    host = _header(scope, b"host")
    if not options.host_allowed(host):
        return APIError(403, f"Host {host!r} is not allowed (serve --allowed-hosts)", code="host_not_allowed",
                        type_="forbidden")
    origin = _header(scope, b"origin")
    if origin is not None and not options.origin_allowed(origin, host):
        return APIError(403, f"cross-origin requests from {origin!r} are not allowed (serve --allowed-origins)",
                        code="origin_not_allowed", type_="forbidden")
    path = scope.get("path", "")
    method = scope.get("method", "")
    if options.api_keys and method != "OPTIONS" and (path.startswith("/v1/") or path in ("/v1", "/metrics")):
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not _key_matches(token.strip(), options.api_keys):
            what = "no API key given" if not auth else "the API key is not valid"
            return APIError(401, f"{what}: send 'Authorization: Bearer KEY' with a key the server was started with",
                            code="invalid_api_key")
    if method == "POST":
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return APIError(415, f"request bodies must be JSON (Content-Type: application/json), got "
                                 f"{content_type or 'none'!r}", code="unsupported_media_type")
    return None


class GuardMiddleware:
    """Refuses requests that `check_request` flags, with an OpenAI-style error body."""

    def __init__(self, app: Any, options: ServerOptions) -> None:
        self.app = app
        self.options = options

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = check_request(scope, self.options)
        if error is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if scope.get("method") == "POST":  # the body was not read: do not reuse the connection
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
