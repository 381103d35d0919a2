"""POST /chat: find the chat model, then its serving path (plan, route and generate, trace);
with `"stream": true`, the answer as server-sent events (sse-starlette)."""

from __future__ import annotations

import logging
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette import EventSourceResponse

from server.api.dependencies import Services, client_gone, loaded_models, services
from server.chat import serving
from server.chat.model import ChatModel
from server.errors import ApiError, error_body
from server.registry import ModelSet
from server.schemas import ChatRequest, ChatResponse, ChatToken

router = APIRouter(tags=["chat"])
log = logging.getLogger(__name__)


def served_chat(models: ModelSet, svc: Services) -> ChatModel:
    if models.chat is None:
        raise ApiError(503 if (reason := svc.registry.unavailable("chat")) else 404,
                       reason or "this server's manifest has no chat model", "model")
    return models.chat


@router.post("/chat", response_model=ChatResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def chat(req: ChatRequest, request: Request, response: Response, models: ModelSet = Depends(loaded_models),
               svc: Services = Depends(services)):
    model = served_chat(models, svc)
    headers = {"X-Loopstack-Generation": str(models.generation)}
    if req.stream:
        pieces = serving.start_stream(req, model, models.generation, svc.settings, svc.chat_engine, svc.metrics,
                                      client_gone(request))
        return EventSourceResponse(native_events(pieces), headers=headers)
    response.headers.update(headers)
    return await serving.answer(req, model, models.generation, svc.settings, svc.chat_engine, svc.metrics,
                                client_gone(request))


async def native_events(pieces: AsyncIterator) -> AsyncIterator[dict]:
    """`token` events ({"text": ...}), then `done` (the response /chat gives without streaming), or
    `error` (the one error shape) when the answer fails after the stream began."""
    try:
        async for item in pieces:
            if isinstance(item, str):
                yield {"event": "token", "data": ChatToken(text=item).model_dump_json()}
            else:
                yield {"event": "done", "data": item.model_dump_json()}
    except ApiError as exc:
        yield {"event": "error", "data": error_body(exc.type, exc.message, exc.param)}
    except Exception:  # the status line has gone out: the failure travels as an event
        log.exception("a streamed chat answer failed")
        yield {"event": "error", "data": error_body("internal_error", "the answer failed; see the server's log")}
