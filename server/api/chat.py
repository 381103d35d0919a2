"""POST /chat: find the chat model, then its serving path (plan, route and generate, trace)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.api.dependencies import Services, loaded_models, services
from server.chat import serving
from server.errors import ApiError
from server.registry import ModelSet
from server.schemas import ChatRequest, ChatResponse

router = APIRouter(tags=["chat"])


@router.post("/chat", response_model=ChatResponse)
async def chat(req: ChatRequest, request: Request, response: Response, models: ModelSet = Depends(loaded_models),
               svc: Services = Depends(services)) -> ChatResponse:
    if models.chat is None:
        raise ApiError(503 if (reason := svc.registry.unavailable("chat")) else 404,
                       reason or "this server's manifest has no chat model", "model")
    response.headers["X-Loopstack-Generation"] = str(models.generation)
    return await serving.answer(req, models.chat, models.generation, svc.settings, svc.chat_engine, svc.metrics,
                                request.is_disconnected)
