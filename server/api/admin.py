"""Admin routes (bearer key; off without LOOPSTACK_ADMIN_TOKEN): reload now, and every entry's state."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server.api.dependencies import Services, admin, services

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin)])


@router.post("/reload")
async def reload(svc: Services = Depends(services)) -> dict:
    """Read the manifest again and load what changed; says what was loaded, refused and kept."""
    return await run_in_threadpool(svc.registry.reload, "admin")


@router.get("/status")
async def status(svc: Services = Depends(services)) -> dict:
    registry = svc.registry
    models = registry.current
    return {"generation": models.generation if models else None, "manifest_error": registry.manifest_error,
            "last_reload": registry.last_reload, "requests_in_flight": registry.in_flight(),
            "entries": registry.status(), "build": registry.build_state()}
