"""What routes receive through FastAPI's dependencies: the app's services and the loaded model set."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

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
    chat_engine: Engine


def services(request: Request) -> Services:
    return request.app.state.services


def loaded_models(svc: Services = Depends(services)) -> ModelSet:
    """The model set this request runs on from start to end (503 while none is loaded)."""
    models = svc.registry.current
    if models is None:
        error = svc.registry.last_error
        raise ApiError(503, "models are still loading" if error is None else f"models failed to load: {error}")
    return models
