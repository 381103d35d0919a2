"""Who may call the public routes and how often, and which request a log line belongs to.

- API keys (`LOOPSTACK_API_KEYS`, comma-separated): the public routes (images, chat, OpenAI's) then
  need `Authorization: Bearer <key>`, as OpenAI's clients send it; health, metrics and the model list
  stay open (probes and scrapers carry no key). Without keys every route is open.
- Rate limits (`LOOPSTACK_RATE_LIMIT_PER_MINUTE`) on the public routes: a token bucket per API key,
  or per client address when no keys are set (a burst of a minute's allowance, refilled
  continuously); over it, 429 with the seconds until the next token in `Retry-After`. Behind a
  proxy every client has the proxy's address: set keys there.
- A request id per request: the client's `X-Request-ID` when it is a sane one, else a new one; it
  comes back in the response's `X-Request-ID` and is on every log line written while the request
  runs (`request_id`, also in the JSON log format).
- Log lines a client cannot forge: the request's path is quoted, and every message has its control
  characters escaped (a path with a `%0a` in it writes `\n`, not a second line; `%1b` writes
  `\x1b`, not a terminal escape), in the text and JSON formats alike.
Written by hand: a few dozen lines, with the one error shape.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response

access_log = logging.getLogger("server.access")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# what the request's own access log line adds ("stream": how a stream ended); one dict per request,
# filled in from the request's tasks (each runs in a copy of its context, holding the same dict)
REQUEST_NOTES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("request_notes", default=None)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
OPEN_PATHS = ("/livez", "/readyz", "/metrics", "/v1/models", "/docs", "/openapi.json", "/redoc", "/admin/")


class TokenBuckets:
    """One bucket per key: `per_minute` tokens at most, refilled at per_minute / 60 a second."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go; else the seconds until a token is there."""
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - when) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class AccessControl:
    """ASGI middleware: the request id for every request; API keys and rate limits on public routes."""

    def __init__(self, app: ASGIApp, api_keys: list[str], rate_limit_per_minute: int):
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.buckets = TokenBuckets(rate_limit_per_minute) if rate_limit_per_minute else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SANE_ID.fullmatch(given) else secrets.token_hex(8)
        token, notes = REQUEST_ID.set(request_id), {}
        notes_token = REQUEST_NOTES.set(notes)

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        started, status = time.perf_counter(), 500

        async def noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await with_id(message)

        try:
            refusal = self._refusal(scope["path"], headers, (scope.get("client") or ("-",))[0])
            if refusal is not None:
                return await refusal(scope, receive, noted)
            await self.app(scope, receive, noted)
        finally:  # the access log line (uvicorn's own runs outside the request and cannot name it)
            access_log.info("%s %s %d %.1f ms%s", scope["method"], quoted(scope["path"]), status,
                            (time.perf_counter() - started) * 1000,
                            "".join(f"; {key} {value}" for key, value in notes.items()))
            REQUEST_ID.reset(token)
            REQUEST_NOTES.reset(notes_token)

    def _refusal(self, path: str, headers: dict, address: str):
        if path == "/" or path.startswith(OPEN_PATHS):
            return None
        holder = f"address {address}"
        if self.keys:
            scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not key:
                return error_response(401, "unauthorized", "an API key is needed: Authorization: Bearer <key>",
                                      headers={"WWW-Authenticate": "Bearer"})
            if not any(hmac.compare_digest(key.encode(), k) for k in self.keys):
                return error_response(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
            holder = f"key {key}"
        if self.buckets is not None and (wait := self.buckets.take(holder)) > 0:
            whose = "this key's" if self.keys else "this client address's"
            return error_response(429, "rate_limited", f"{whose} rate limit is reached; retry in {wait:.1f} s",
                                  headers={"Retry-After": str(math.ceil(wait))})
        return None


def note(key: str, value: str) -> None:
    """Add to the current request's access log line (`; <key> <value>`)."""
    notes = REQUEST_NOTES.get()
    if notes is not None:
        notes[key] = value


def escaped(text: str) -> str:
    """`text` with every character that is not printable (newlines, terminal escapes, other controls)
    written as a Python escape, and backslashes doubled: one log line stays one line, as sent."""
    return "".join(c if c.isprintable() and c != "\\" else ("\\\\" if c == "\\" else repr(c)[1:-1]) for c in text)


def quoted(text: str) -> str:
    """A client's string as a log line shows it: escaped, in double quotes (a quote inside escaped)."""
    return '"' + escaped(text).replace('"', '\\"') + '"'


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every log record (`-` outside a request), and escapes the
    control characters of its message (exception tracebacks keep their lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = escaped(message), ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "request_id": getattr(record, "request_id", "-")}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str) -> None:
    """The server's log lines, each with its request id; `json`: one JSON object per line."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # through the same handler
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
