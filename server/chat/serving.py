"""A /chat request's way through the server, HTTP aside: plan the job (every bound checked, the
route validated), then, once the chat worker has answered, the routing trace and the metrics.

The route travels inside the job; the chat engine (server/chat/batching.py) plans it when the
request joins its batch (running the meta-router for "auto") and decodes with exactly those weights,
so the trace reports the weights that were applied.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import torch
from jinja2 import TemplateError

from server.chat.batching import ChatEngine, ClientGone, DeadlineExceeded
from server.chat.streamed import stream_listener
from server.chat.decoding import ChatJob, ChatResult
from server.chat.model import ChatModel
from server.chat.structured import constraint_tokenizer, has_constraint_tokenizer, output_format
from server.errors import ApiError
from server.metrics import Metrics, since_arrival
from server.schemas.chat import ChatRequest, ChatResponse, FormatTrace, RouteTrace, Usage
from server.schemas.common import MAX_SEED
from server.settings import Settings


@dataclass(frozen=True)
class ChatService:
    """What chat requests run on: the operator's bounds, the chat engine, the metrics."""

    settings: Settings
    engine: ChatEngine
    metrics: Metrics


async def answer(req: ChatRequest, chat: ChatModel, generation: int, service: ChatService,
                 disconnected: Callable[[], Awaitable[bool]] | None = None) -> ChatResponse:
    """Plan the job, answer it on the chat engine (route, then decode in its batch), trace it, record it."""
    await ready_for_format(req, chat)
    job = plan_job(req, chat, service.settings)
    submitted = time.perf_counter()
    try:
        result = await service.engine.submit(chat, job, disconnected)
    except DeadlineExceeded as exc:
        raise ApiError(504, f"{exc} (the server's chat timeout); ask for fewer max_tokens, or retry later",
                       "max_tokens") from None
    except ClientGone:
        raise ApiError(499, "the client closed the request before its answer was ready") from None
    trace = make_trace(job, result, result.started - submitted, generation)
    record_metrics(service.metrics, job, result, trace)
    return respond(chat, job, result, trace)


async def start_stream(req: ChatRequest, chat: ChatModel, generation: int, service: ChatService,
                       disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[str | ChatResponse]:
    """Plan the job and queue it now (a refusal or a full queue is an HTTP error before any event);
    the answer's text pieces as they are decoded, then the whole response. A passed deadline raises
    ApiError (504) from the iterator; a client that has gone ends it."""
    await ready_for_format(req, chat)
    job = plan_job(req, chat, service.settings)
    submitted = time.perf_counter()
    row = service.engine.enqueue(chat, job, stream_listener())

    async def pieces() -> AsyncIterator[str | ChatResponse]:
        try:
            async for item in service.engine.stream(row, disconnected):
                if isinstance(item, str):
                    yield item
                    continue
                trace = make_trace(job, item, item.started - submitted, generation)
                record_metrics(service.metrics, job, item, trace)
                yield respond(chat, job, item, trace)
        except DeadlineExceeded as exc:
            raise ApiError(504, f"{exc} (the server's chat timeout)", "max_tokens") from None
        except ClientGone:
            return

    return pieces()


async def ready_for_format(req: ChatRequest, chat: ChatModel) -> None:
    """The first structured request on a model builds the constraint's view of its tokenizer (seconds),
    off the event loop."""
    if req.response_format is not None and req.response_format.type != "text" and not has_constraint_tokenizer(chat):
        await asyncio.to_thread(constraint_tokenizer, chat)


def plan_job(req: ChatRequest, chat: ChatModel, settings: Settings) -> ChatJob:
    """Check a request against the model and the operator's bounds; every refusal names its field."""
    messages = req.as_messages()
    if len(messages) > settings.max_chat_messages:
        raise ApiError(422, f"messages: at most {settings.max_chat_messages}", "messages")
    for i, m in enumerate(messages):
        param = "prompt" if req.prompt is not None else f"messages.{i}.content"
        if not m["content"].strip():
            raise ApiError(422, f"{param}: must not be blank", param)
        if len(m["content"]) > settings.max_prompt_chars:
            raise ApiError(422, f"{param}: at most {settings.max_prompt_chars} characters", param)
    if req.max_tokens is not None and req.max_tokens > settings.max_new_tokens:
        raise ApiError(422, f"max_tokens: at most {settings.max_new_tokens}", "max_tokens")
    input_ids = render(chat, messages, "prompt" if req.prompt is not None else "messages")
    max_tokens = fit_to_context(chat, int(input_ids.shape[1]), req, settings)
    if isinstance(req.route, dict):
        for domain, weight in req.route.items():
            if domain not in chat.route_names:
                raise ApiError(422, f"route: unknown domain or adapter {domain!r}; served: domains "
                                    f"{list(chat.domains)}, adapters {list(chat.adapters)}", "route")
            if not 0.0 <= weight <= 2.0:
                raise ApiError(422, f"route: weight of {domain!r} must be in [0, 2]", "route")
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
    return ChatJob(messages, max_tokens, req.temperature, req.top_p, seed, req.route, tuple(req.stop or ()),
                   input_ids, output_format=output_format(req.response_format, chat))


def render(chat: ChatModel, messages: list[dict[str, str]], param: str) -> torch.Tensor:
    """The prompt through the model's chat template; a conversation the template refuses is the
    client's to fix (422 with the template's reason)."""
    try:
        return chat.encode(messages)
    except TemplateError as exc:
        raise ApiError(422, f"{param}: the chat template of {chat.name!r} refuses this conversation: {exc}",
                       param) from None


def fit_to_context(chat: ChatModel, prompt_tokens: int, req: ChatRequest, settings: Settings) -> int:
    """The prompt within the operator's bound in tokens, and max_tokens within what the model's
    context leaves after it: an explicit value that does not fit is refused, the default is cut to fit."""
    param = "prompt" if req.prompt is not None else "messages"
    if prompt_tokens > settings.max_prompt_tokens:
        raise ApiError(422, f"{param}: the prompt is {prompt_tokens} tokens as {chat.name!r} reads it; at most "
                            f"{settings.max_prompt_tokens}", param)
    context = chat.context_length
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(422, f"{param}: the prompt is {prompt_tokens} tokens; {chat.name!r} has a context of "
                            f"{context} tokens, prompt and answer together", param)
    if req.max_tokens is None:
        return min(settings.default_max_tokens, settings.max_new_tokens, room)
    if req.max_tokens > room:
        raise ApiError(422, f"max_tokens: {req.max_tokens} does not fit: the prompt is {prompt_tokens} tokens of "
                            f"the {context}-token context of {chat.name!r}, which leaves {room}", "max_tokens")
    return req.max_tokens


def make_trace(job: ChatJob, result: ChatResult, queue_seconds: float, generation: int) -> RouteTrace:
    plan = result.plan
    ttft = result.token_times[0] - result.started if result.token_times else None
    end = result.token_times[-1] if result.token_times else result.started
    return RouteTrace(
        route_requested=job.route,
        domains_applied=plan.weights,
        gated_off=plan.gated_off,
        router_probabilities=plan.probabilities,
        reason=plan.reason,
        queue_seconds=queue_seconds,
        time_to_first_token_seconds=ttft,
        generation_seconds=max(end - result.started, 0.0),
        generation=generation,
        response_format=None if job.output_format is None else FormatTrace(
            type=job.output_format.type, name=job.output_format.name, complete=bool(result.format_complete)),
    )


def record_metrics(metrics: Metrics, job: ChatJob, result: ChatResult, trace: RouteTrace) -> None:
    route_kind = job.route if isinstance(job.route, str) else "explicit"
    for domain, weight in result.plan.weights.items():
        metrics.chat_domain_applied.labels(domain=domain, route=route_kind).inc()
        metrics.chat_domain_weight.labels(domain=domain).observe(weight)
    for domain, probability in (result.plan.probabilities or {}).items():
        metrics.chat_router_probability.labels(domain=domain).observe(probability)
    metrics.chat_prompt_tokens.inc(result.prompt_tokens)
    metrics.chat_generation_tokens.inc(result.completion_tokens)
    metrics.chat_finished.labels(finish_reason=result.finish_reason).inc()
    metrics.chat_request_prompt_tokens.observe(result.prompt_tokens)
    metrics.chat_request_generation_tokens.observe(result.completion_tokens)
    if result.token_times:
        metrics.chat_request_prefill_seconds.observe(result.token_times[0] - result.started)
        metrics.chat_request_decode_seconds.observe(result.token_times[-1] - result.token_times[0])
    if result.token_times:  # from the request's arrival: parsing, the queue and the router count too
        from_arrival = since_arrival(result.token_times[0])
        metrics.chat_ttft.observe(from_arrival if from_arrival is not None else trace.time_to_first_token_seconds)
    for earlier, later in zip(result.token_times, result.token_times[1:]):
        metrics.chat_itl.observe(later - earlier)


def respond(chat: ChatModel, job: ChatJob, result: ChatResult, trace: RouteTrace) -> ChatResponse:
    return ChatResponse(
        model=chat.name, text=result.text, finish_reason=result.finish_reason, seed=job.seed,
        placeholder=chat.spec.placeholder,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens),
        trace=trace,
    )
