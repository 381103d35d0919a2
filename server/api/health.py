"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.dependencies import loaded_models
from server.registry import ModelSet
from server.schemas import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict:
    return {"status": "alive"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(models: ModelSet = Depends(loaded_models)) -> dict:
    return {"status": "ready", "image_models": sorted(models.images),
            "chat_model": models.chat.name if models.chat else None}
