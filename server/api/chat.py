"""POST /chat: find the chat model, then its serving path (plan, route and generate, trace);
with `"stream": true`, the answer as server-sent events (sse-starlette)."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from server.api.dependencies import Services, client_gone, json_body, loaded_models, services
from server.api.lookup import served_chat
from server.api.streaming import event_stream, named_error
from server.chat import serving
from server.registry import ModelSet
from server.schemas.chat import ChatRequest, ChatResponse, ChatToken

router = APIRouter(tags=["chat"], dependencies=[Depends(json_body)])


@router.post("/chat", response_model=ChatResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def chat(req: ChatRequest, request: Request, response: Response, models: ModelSet = Depends(loaded_models),
               svc: Services = Depends(services)):
    model = served_chat(models, svc.registry, req.model)
    headers = {"X-Loopstack-Generation": str(models.generation)}
    if req.stream:
        pieces = await serving.start_stream(req, model, models.generation, svc.chat, client_gone(request))
        return event_stream(native_events(pieces), named_error, "answer", svc.settings, headers)
    response.headers.update(headers)
    return await serving.answer(req, model, models.generation, svc.chat, client_gone(request))


async def native_events(pieces: AsyncIterator) -> AsyncIterator[dict]:
    """`token` events ({"text": ...}), then `done` (the response /chat gives without streaming)."""
    async for item in pieces:
        if isinstance(item, str):
            yield {"event": "token", "data": ChatToken(text=item).model_dump_json()}
        else:
            yield {"event": "done", "data": item.model_dump_json()}
