"""OpenAI's API on Loopstack's serving paths: chat completions (`POST /v1/chat/completions`), streamed
or not, and image generations (`POST /v1/images/generations`). Each request becomes a native one
(a chat route alias in `model` or `route` in the extra body; image sampling settings in the extra
body), and the answer comes back in OpenAI's shapes with what Loopstack ran in `loopstack` (the
chat trace on the finishing chunk when streaming)."""

from __future__ import annotations

import re
import secrets
import time
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from server.api.dependencies import Services, client_gone, json_body, loaded_models, services
from server.api.lookup import alias_route, served_chat, served_image
from server.api.streaming import event_stream
from server.chat import serving
from server.chat.model import ChatModel
from server.errors import ApiError
from server.imaging import serving as image_serving
from server.imaging.backbones import ImageBackbone
from server.registry import ModelSet
from server.schemas.chat import ChatRequest, ChatResponse
from server.schemas.images import ImageRequest
from server.schemas.openai import (
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, ChunkDelta, CompletionAnswer,
    CompletionChoice, GeneratedImage, ImageGenerationRequest, ImagesResponse, LoopstackExtra,
)

router = APIRouter(tags=["openai"], dependencies=[Depends(json_body)])


def native_request(req: ChatCompletionRequest, chat: ChatModel) -> ChatRequest:
    if bad := req.unsupported():
        raise ApiError(422, f"{bad[0]}: not supported by Loopstack ({bad[1]})", bad[0])
    route = alias_route(req.model, chat)
    if route is not None and req.route is not None and req.route != route:
        raise ApiError(422, f"route: the model alias {req.model!r} already names a route; give one or the other",
                       "route")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise ApiError(422, f"messages.{i}.content: must not be blank", f"messages.{i}.content")
    try:
        return ChatRequest.model_validate({
            "messages": messages, "stop": req.stop, "seed": req.seed,
            "max_tokens": req.max_completion_tokens or req.max_tokens,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "route": req.route or route or "auto", "response_format": req.response_format})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{param}: {first['msg']}" if param else first["msg"], param) from None


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(req: ChatCompletionRequest, request: Request, response: Response,
                           models: ModelSet = Depends(loaded_models), svc: Services = Depends(services)):
    chat = served_chat(models, svc.registry)
    native = native_request(req, chat)
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    fingerprint = f"generation-{models.generation}"
    headers = {"X-Loopstack-Generation": str(models.generation)}
    if req.stream:
        pieces = await serving.start_stream(native, chat, models.generation, svc.chat, client_gone(request))
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=req.model, choices=[],
                                    system_fingerprint=fingerprint)
        usage = req.stream_options is not None and req.stream_options.include_usage
        return event_stream(chunks(pieces, chunk, usage), lambda body: {"data": body}, "answer", svc.settings, headers,
                            last={"data": "[DONE]"})
    answer = await serving.answer(native, chat, models.generation, svc.chat, client_gone(request))
    response.headers.update(headers)
    return ChatCompletion(
        id=completion_id, created=created, model=req.model, system_fingerprint=fingerprint, usage=answer.usage,
        choices=[CompletionChoice(message=CompletionAnswer(content=answer.text), finish_reason=answer.finish_reason)],
        loopstack=extra(answer))


def extra(answer: ChatResponse) -> LoopstackExtra:
    return LoopstackExtra(seed=answer.seed, placeholder=answer.placeholder, trace=answer.trace)


async def chunks(pieces: AsyncIterator, chunk: ChatCompletionChunk, include_usage: bool) -> AsyncIterator[dict]:
    """OpenAI's stream: the assistant's role, its content in pieces, a chunk with the finish reason
    (and Loopstack's trace), with `include_usage` one more with the usage and no choices; then
    [DONE] (`event_stream` sends it last, after an `error` chunk, as OpenAI sends one, if it failed)."""

    def data(**update) -> dict:
        return {"data": chunk.model_copy(update=update).model_dump_json(exclude_none=True)}

    yield data(choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
    async for item in pieces:
        if isinstance(item, str):
            yield data(choices=[ChunkChoice(delta=ChunkDelta(content=item))])
            continue
        yield data(choices=[ChunkChoice(delta=ChunkDelta(), finish_reason=item.finish_reason)], loopstack=extra(item))
        if include_usage:
            yield data(choices=[], usage=item.usage)


# ---------------------------------------------------------------- images
@router.post("/v1/images/generations", response_model=ImagesResponse)
async def image_generations(req: ImageGenerationRequest, request: Request, response: Response,
                            models: ModelSet = Depends(loaded_models),
                            svc: Services = Depends(services)) -> ImagesResponse:
    backbone = served_image(req.model, models, svc.registry)
    if req.response_format == "url":
        raise ApiError(422, "response_format: 'url' is not supported (no image hosting); use b64_json",
                       "response_format")
    native = native_image_request(req, backbone)
    job = image_serving.plan_job(native, backbone, svc.settings)
    result = await image_serving.run_job(backbone, job, image_serving.deadline_of(native, svc.settings),
                                         svc.images, client_gone(request))
    image_serving.record_metrics(svc.metrics, backbone, job, result)
    answer = image_serving.image_response(backbone, job, result, models.generation)
    response.headers["X-Loopstack-Generation"] = str(models.generation)
    return ImagesResponse(created=int(time.time()), data=[GeneratedImage(b64_json=i) for i in answer.images],
                          size=f"{answer.width}x{answer.height}", loopstack=answer.model_dump(exclude={"images"}))


def native_image_request(req: ImageGenerationRequest, backbone: ImageBackbone) -> ImageRequest:
    """The native request: the size parsed, and for a class-conditional model the prompt read as a
    class name unless class_label is given."""
    width = height = None
    if req.size not in (None, "auto"):
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", req.size)
        if match is None:
            raise ApiError(422, f"size: {req.size!r} is not WIDTHxHEIGHT or 'auto'", "size")
        width, height = int(match[1]), int(match[2])
        if not (width and height):
            raise ApiError(422, "size: width and height must be positive", "size")
    prompt, class_label = req.prompt, req.class_label
    if backbone.spec.kind == "dit":
        prompt = None
        if class_label is None:
            names = backbone.class_names()
            if req.prompt.strip().lower() not in names:
                raise ApiError(422, f"prompt: {backbone.name} is class-conditional; the prompt must be one of its "
                                    f"classes {names} (or send class_label)", "prompt")
            class_label = req.prompt.strip().lower()
    return ImageRequest(model=req.model, prompt=prompt, class_label=class_label, steps=req.steps,
                        guidance_scale=req.guidance_scale, seed=req.seed, n=req.n or 1, width=width, height=height,
                        scheduler=req.scheduler, mode=req.mode, first_block_cache=req.first_block_cache)
