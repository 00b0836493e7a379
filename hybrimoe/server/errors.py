"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server reports, its own or the framework's (unknown path, wrong method), leaves
through `error_response`, so clients always see the same shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrimoe.server.schemas import ErrorBody, ErrorInfo

log = logging.getLogger(__name__)

STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "forbidden",
                404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
                413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to report to the client with `status` (4xx for the client's mistakes)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or STATUS_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=info).model_dump()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """400 naming the first offending field (dotted path, as OpenAI's `param`) and what was wrong."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _param_path(first.get("loc", ()))
    message = first.get("msg", "invalid request")
    missing = first.get("type") == "missing"
    if missing:
        message = f"missing required field '{param}'"
    elif param:
        message = f"invalid value for '{param}': {message}"
    others = {_param_path(e.get("loc", ())) for e in errors} - {param}
    if others:
        message += f" (also invalid: {', '.join(sorted(p or '(body)' for p in others))})"
    return APIError(400, message, param=param, code="missing_required_parameter" if missing else "invalid_value")


def _param_path(loc: tuple) -> str | None:
    """Dotted field path of a pydantic error location, without the union-member tags pydantic adds
    (('prompt', 'list[int]', 2) -> 'prompt'; ('messages', 0, 'role') -> 'messages.0.role')."""
    parts: list[str] = []
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "StreamOptions"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(from_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        # A 405 carries the route's `Allow` header (RFC 9110 requires it).
        return error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(APIError(500, "internal server error", type_="server_error"))
