"""What routes receive through FastAPI's dependencies: the app's services, the model set a request
runs on from start to end, and the admin key check."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterator

from fastapi import Depends, Request

from server.chat.batching import ChatBatcher
from server.engine import Engine
from server.errors import ApiError
from server.metrics import Metrics
from server.registry import ModelSet, Registry
from server.settings import Settings


@dataclass(frozen=True)
class Services:
    """Made once per app by `create_app`."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    image_engine: Engine
    chat_engine: ChatBatcher


def services(request: Request) -> Services:
    return request.app.state.services


def loaded_models(svc: Services = Depends(services)) -> Iterator[ModelSet]:
    """The model set this request runs on from start to end (503 while none is loaded); held until
    the response is sent, so a reload frees the old set's memory only after its requests finished."""
    models = svc.registry.acquire()
    if models is None:
        raise ApiError(503, svc.registry.not_serving_reason())
    try:
        yield models
    finally:
        svc.registry.release(models)


def admin(request: Request, svc: Services = Depends(services)) -> None:
    """`Authorization: Bearer <LOOPSTACK_ADMIN_TOKEN>`; the admin routes do not exist without a token."""
    token = svc.settings.admin_token
    if token is None:
        raise ApiError(404, "admin routes are off: set LOOPSTACK_ADMIN_TOKEN to turn them on")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "admin routes need Authorization: Bearer <LOOPSTACK_ADMIN_TOKEN>", type="unauthorized")
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(403, "wrong admin token", type="forbidden")
