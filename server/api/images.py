"""POST /generate-image: find the model, then its serving path (plan, sample, answer PNG or JSON);
with `"stream": true`, progress after each step and then the images, as server-sent events."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from server.api.dependencies import Services, client_gone, json_body, loaded_models, services
from server.api.lookup import served_image
from server.api.streaming import event_stream, named_error
from server.imaging import serving
from server.registry import ModelSet
from server.schemas.images import ImageProgress, ImageRequest, ImageResponse

router = APIRouter(tags=["images"], dependencies=[Depends(json_body)])


@router.post(
    "/generate-image",
    response_model=ImageResponse,
    responses={200: {"content": {"image/png": {}, "text/event-stream": {}},
                     "description": "JSON, the PNG itself, or with `stream` server-sent events"}},
)
async def generate_image(req: ImageRequest, request: Request, models: ModelSet = Depends(loaded_models),
                         svc: Services = Depends(services)):
    backbone = served_image(req.model, models, svc.registry)
    if req.stream:
        events = await serving.start_stream(req, backbone, models.generation, svc.images)
        return event_stream(image_events(events), named_error, "sampling", svc.settings,
                            {"X-Loopstack-Generation": str(models.generation)})
    as_png = req.response_format == "png" or "image/png" in request.headers.get("accept", "")
    return await serving.generate(req, backbone, models.generation, svc.images, as_png, client_gone(request))


async def image_events(events: AsyncIterator) -> AsyncIterator[dict]:
    """`progress` after each denoising step, then `done` (the JSON response)."""
    async for item in events:
        if isinstance(item, serving.Progress):
            yield {"event": "progress", "data": ImageProgress(step=item.step, steps=item.steps,
                                                              mode=item.mode).model_dump_json()}
        else:
            yield {"event": "done", "data": item.model_dump_json()}
