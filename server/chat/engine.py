"""From a chat request to a generation job, and the routing trace that explains the answer.

The base model serves alone until Brainstacks domains are in the manifest; the trace says so.
"""

from __future__ import annotations

import secrets

from server.chat.base import ChatJob, ChatModel, ChatResult
from server.errors import ApiError
from server.manifest import ChatSection
from server.schemas import MAX_SEED, ChatRequest, RouteTrace
from server.settings import Settings


def plan_job(req: ChatRequest, chat: ChatModel, settings: Settings) -> ChatJob:
    if req.model is not None and req.model != chat.name:
        raise ApiError(404, f"unknown chat model {req.model!r}; this server serves {chat.name!r}", "model")
    messages = req.as_messages()
    if len(messages) > settings.max_chat_messages:
        raise ApiError(422, f"messages: at most {settings.max_chat_messages}", "messages")
    for i, m in enumerate(messages):
        param = "prompt" if req.prompt is not None else f"messages.{i}.content"
        if not m["content"].strip():
            raise ApiError(422, f"{param}: must not be blank", param)
        if len(m["content"]) > settings.max_prompt_chars:
            raise ApiError(422, f"{param}: at most {settings.max_prompt_chars} characters", param)
    if req.max_tokens > settings.max_new_tokens:
        raise ApiError(422, f"max_tokens: at most {settings.max_new_tokens}", "max_tokens")
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
    return ChatJob(messages, req.max_tokens, req.temperature, req.top_p, seed)


def check_route(route, section: ChatSection) -> None:
    known = [d.name for d in section.domains]
    if isinstance(route, dict):
        for domain, weight in route.items():
            if domain not in known:
                raise ApiError(422, f"route: unknown domain {domain!r}; served domains: {known}", "route")
            if not 0.0 <= weight <= 2.0:
                raise ApiError(422, f"route: weight of {domain!r} must be in [0, 2]", "route")


def base_only_trace(route, section: ChatSection, result: ChatResult, queue_seconds: float) -> RouteTrace:
    """The trace when no stack is applied: which domains exist and why each was left off."""
    if route == "none":
        reason = "route 'none': the base model alone was requested"
    elif not section.domains:
        reason = "no Brainstacks domains are loaded; the base model answered alone"
    else:
        reason = "the base model answered alone"
    gated = {
        d.name: "route 'none'" if route == "none" else "stack routing is not enabled on this server"
        for d in section.domains
    }
    ttft = result.token_times[0] - result.started if result.token_times else None
    end = result.token_times[-1] if result.token_times else result.started
    return RouteTrace(
        route_requested=route,
        domains_applied={},
        gated_off=gated,
        router_probabilities=None,
        reason=reason,
        queue_seconds=queue_seconds,
        time_to_first_token_seconds=ttft,
        generation_seconds=max(end - result.started, 0.0),
    )
