"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server import status
from server.api.dependencies import Services, services
from server.errors import ApiError
from server.schemas.common import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict:
    return {"status": "alive"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(svc: Services = Depends(services)) -> dict:
    """200 once a model serves (more may still be loading); the body names what serves, what is a
    placeholder, what is loading and what was refused, by entry name only."""
    readiness = status.readiness(svc.registry)
    if not readiness["serving"]:
        raise ApiError(503, status.not_serving_reason(svc.registry))
    return {"status": "ready", **readiness}
