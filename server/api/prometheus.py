"""GET /metrics: the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.dependencies import Services, services

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(svc: Services = Depends(services)) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
