"""Admin routes (bearer key; off without LOOPSTACK_ADMIN_TOKEN): reload now, and every entry's state."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server import status
from server.api.dependencies import Services, admin, services

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin)])


@router.post("/reload")
async def reload(svc: Services = Depends(services)) -> dict:
    """Read the manifest again and load what changed; says what was loaded, refused and kept."""
    return await run_in_threadpool(svc.registry.reload, "admin")


@router.get("/status")
async def admin_status(svc: Services = Depends(services)) -> dict:
    return status.admin_status(svc.registry)
