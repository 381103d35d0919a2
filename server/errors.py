"""One error shape for every failure: {"error": {"type", "message", "param"}}."""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine import QueueFull

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    499: "client_closed_request",
    503: "not_ready",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "error")
        super().__init__(message)


def error_response(status: int, type: str, message: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type, "message": message, "param": param}}, status_code=status, headers=headers
    )


def error_body(type: str, message: str, param: str | None = None) -> str:
    """The error shape as JSON text, for a failure inside a stream that has already begun."""
    return json.dumps({"error": {"type": type, "message": message, "param": param}})


def _validation_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names the union branch it tried (e.g. 'int', 'str'); keep the field path only
    parts = [p for p in parts if not p.startswith(("function-", "literal[", "dict[", "list["))]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.param)

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull):
        return error_response(429, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return error_response(422, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, _TYPES.get(exc.status_code, "error"), str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal", "internal server error; the server log has details")


class CatchUnhandled:
    """An exception past every handler is answered here, 500 in the error shape. Starlette's own
    last-resort handler answers too but then re-raises to the server, and uvicorn closes the
    connection: a keep-alive client's next request would fail. Innermost of the middleware, so the
    request counter sees the 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:  # half a response has gone out: only the server can end it
                raise
            log.exception("unhandled error")
            await error_response(500, "internal", "internal server error; the server log has details")(
                scope, receive, send)


class BodySizeLimit:
    """Refuses bodies over a limit with 413 before the app reads them (header or streamed count),
    and bodies that have not all arrived within `timeout` seconds with 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)

        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.timeout):
                while more:  # buffer the (bounded) body, then replay it to the app
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return await self._refuse(scope, receive, send)
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            response = error_response(408, "request_timeout", f"the request body did not arrive within "
                                                              f"{self.timeout:g} s", headers={"Connection": "close"})
            return await response(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large", f"request body exceeds {self.max_bytes} bytes")
        await response(scope, receive, send)
