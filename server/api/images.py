"""POST /generate-image: find the model, then its serving path (plan, sample, answer PNG or JSON)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.dependencies import Services, loaded_models, services
from server.errors import ApiError
from server.imaging import serving
from server.registry import ModelSet
from server.schemas import ImageRequest, ImageResponse

router = APIRouter(tags=["images"])


@router.post(
    "/generate-image",
    response_model=ImageResponse,
    responses={200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself"}},
)
async def generate_image(req: ImageRequest, request: Request, models: ModelSet = Depends(loaded_models),
                         svc: Services = Depends(services)):
    backbone = models.images.get(req.model)
    if backbone is None:
        if reason := svc.registry.unavailable("image", req.model):
            raise ApiError(503, reason, "model")
        raise ApiError(404, f"unknown image model {req.model!r}; serving: {sorted(models.images)}", "model")
    as_png = req.response_format == "png" or "image/png" in request.headers.get("accept", "")
    return await serving.generate(req, backbone, models.generation, svc.settings, svc.image_engine, svc.metrics,
                                  as_png)
