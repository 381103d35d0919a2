"""POST /generate-image: find the model, then its serving path (plan, sample, answer PNG or JSON);
with `"stream": true`, progress after each step and then the images, as server-sent events."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from server.api.dependencies import Services, client_gone, loaded_models, services
from server.errors import ApiError, error_body
from server.imaging import serving
from server.registry import ModelSet
from server.schemas import ImageProgress, ImageRequest, ImageResponse

router = APIRouter(tags=["images"])
log = logging.getLogger(__name__)


@router.post(
    "/generate-image",
    response_model=ImageResponse,
    responses={200: {"content": {"image/png": {}, "text/event-stream": {}},
                     "description": "JSON, the PNG itself, or with `stream` server-sent events"}},
)
async def generate_image(req: ImageRequest, request: Request, models: ModelSet = Depends(loaded_models),
                         svc: Services = Depends(services)):
    backbone = models.images.get(req.model)
    if backbone is None:
        if reason := svc.registry.unavailable("image", req.model):
            raise ApiError(503, reason, "model")
        raise ApiError(404, f"unknown image model {req.model!r}; serving: {sorted(models.images)}", "model")
    if req.stream:
        events = await serving.start_stream(req, backbone, models.generation, svc.settings, svc.image_batcher,
                                            svc.metrics)
        return EventSourceResponse(image_events(events), headers={"X-Loopstack-Generation": str(models.generation)})
    as_png = req.response_format == "png" or "image/png" in request.headers.get("accept", "")
    return await serving.generate(req, backbone, models.generation, svc.settings, svc.image_batcher, svc.metrics,
                                  as_png, client_gone(request))


async def image_events(events: AsyncIterator) -> AsyncIterator[dict]:
    """`progress` after each denoising step, then `done` (the JSON response), or `error`."""
    try:
        async for item in events:
            if isinstance(item, serving.Progress):
                yield {"event": "progress", "data": ImageProgress(step=item.step, steps=item.steps,
                                                                  mode=item.mode).model_dump_json()}
            else:
                yield {"event": "done", "data": item.model_dump_json()}
    except ApiError as exc:
        yield {"event": "error", "data": error_body(exc.type, exc.message, exc.param)}
    except Exception:  # the status line has gone out: the failure travels as an event
        log.exception("a streamed image request failed")
        yield {"event": "error", "data": error_body("internal_error", "sampling failed; see the server's log")}
