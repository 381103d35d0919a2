"""What routes receive through FastAPI's dependencies: the app's services, the model set a request
runs on from start to end, and the admin key check."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

from fastapi import Depends, Request

from server import status
from server.chat.serving import ChatService
from server.engine import Engine
from server.errors import ApiError
from server.imaging.serving import ImageService
from server.metrics import Metrics
from server.registry import ModelSet, Registry
from server.settings import Settings


@dataclass(frozen=True)
class Services:
    """Made once per app by `create_app`; its engines run from the app's start to its end."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    images: ImageService
    chat: ChatService
    engines: tuple[Engine, ...]


def services(request: Request) -> Services:
    return request.app.state.services


def loaded_models(svc: Services = Depends(services)) -> Iterator[ModelSet]:
    """The model set this request runs on from start to end (503 while none is loaded); held until
    the response is sent, so a reload frees the old set's memory only after its requests finished."""
    models = svc.registry.acquire()
    if models is None:
        raise ApiError(503, status.not_serving_reason(svc.registry))
    try:
        yield models
    finally:
        svc.registry.release(models)


def bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given if scheme.lower() == "bearer" and given else None


def operator(request: Request, svc: Services = Depends(services)) -> bool:
    """Whether the caller may see operator details (refusal reasons, the build's process): it holds
    the admin token, or the server has no access control at all (no API keys, no admin token: a
    server open to whoever reaches it, such as `make serve` on a laptop)."""
    token = svc.settings.admin_token
    if token is None:
        return not svc.settings.api_key_list
    given = bearer(request)
    return given is not None and secrets.compare_digest(given.encode(), token.get_secret_value().encode())


def json_body(request: Request) -> None:
    """Routes that read a JSON body: any other content type is a 415, not a confusing 422."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"the body must be JSON, sent with Content-Type: application/json (got "
                            f"{media or 'no content type'!r})")


def admin(request: Request, svc: Services = Depends(services)) -> None:
    """`Authorization: Bearer <LOOPSTACK_ADMIN_TOKEN>`; without a token the admin routes answer 404."""
    token = svc.settings.admin_token
    if token is None:
        raise ApiError(404, "admin routes are off: set LOOPSTACK_ADMIN_TOKEN to turn them on")
    given = bearer(request)
    if given is None:
        raise ApiError(401, "admin routes need Authorization: Bearer <LOOPSTACK_ADMIN_TOKEN>", type="unauthorized")
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(403, "wrong admin token", type="forbidden")


def client_gone(request: Request) -> Callable[[], Awaitable[bool]]:
    """A check, for polling while a request waits on an engine, of whether its client has gone.

    Starlette's `request.is_disconnected` looks for a disconnect message without waiting, and under
    the HTTP middleware that never finds one (the middleware's receive has to wait to answer): an
    abandoned request would run to its end. This waits on the request's receive in a task of its own
    instead, started at the first check; it ends by itself when the response completes."""
    watcher: asyncio.Task | None = None

    async def until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def gone() -> bool:
        nonlocal watcher
        if watcher is None:
            watcher = asyncio.ensure_future(until_disconnect())
            watcher.add_done_callback(lambda task: task.cancelled() or task.exception())
            await asyncio.sleep(0)
        return watcher.done()

    return gone
