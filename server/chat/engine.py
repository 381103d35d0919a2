"""From a chat request to a generation job, and the routing trace that explains the answer.

A route names the domains whose frozen stacks apply to this request, with their weights; the trace
reports what was applied and why every other domain was left off.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class RoutePlan:
    weights: dict[str, float]  # domain -> weight applied to its stacks
    gated_off: dict[str, str]  # domain -> why it is not applied
    reason: str
    probabilities: dict[str, float] | None = None  # the meta-router's output, when it ran


def plan_route(route, section: ChatSection, chat: ChatModel, messages: list[dict[str, str]]) -> RoutePlan:
    """The weights a request's route applies, and why every other domain stays off. Runs the
    meta-router for "auto", so it belongs on the chat worker thread."""
    domains = [d.name for d in section.domains]
    stacks = chat.stacks
    if route == "none":
        return RoutePlan({}, {d: "route 'none'" for d in domains}, "route 'none': the base model alone was requested")
    if route == "auto":
        if not domains:
            return RoutePlan({}, {}, "no Brainstacks domains are loaded; the base model answered alone")
        if chat.router is None:
            why = "no meta-router is loaded, so 'auto' applies no stacks; a {domain: weight} route applies them"
            return RoutePlan({}, {d: why for d in domains}, "no meta-router is loaded; the base model answered alone")
        probabilities = chat.router_probabilities(messages)
        weights, gated = chat.router.route(torch.tensor([probabilities[d] for d in chat.router.config.domains]))
        for domain in list(weights):
            if not stacks.get(domain):
                gated[domain] = "no stacks are loaded for this domain"
                del weights[domain]
        for domain in domains:
            if domain not in weights and domain not in gated:
                gated[domain] = "the meta-router does not know this domain"
        applied = ", ".join(f"{d} x {w:.2f}" for d, w in weights.items()) or "no domain"
        return RoutePlan(weights, gated, f"meta-router: applied {applied}", probabilities)
    weights, gated = {}, {}
    for domain in domains:
        weight = route.get(domain)
        if weight is None:
            gated[domain] = "not in the requested route"
        elif weight == 0:
            gated[domain] = "weight 0 requested"
        elif not stacks.get(domain):
            gated[domain] = "no stacks are loaded for this domain"
        else:
            weights[domain] = weight
    applied = ", ".join(f"{d} x {w:g}" for d, w in weights.items())
    reason = f"route requested explicitly: {applied}" if weights else \
        "route requested explicitly, but no requested domain has stacks; the base model answered alone"
    return RoutePlan(weights, gated, reason)


def route_and_generate(chat: ChatModel, section: ChatSection, job: ChatJob, route) -> tuple[RoutePlan, ChatResult]:
    """What the chat worker runs per request: route (the meta-router for "auto"), then generate."""
    plan = plan_route(route, section, chat, job.messages)
    return plan, chat.generate(job, plan.weights)


def make_trace(route, plan: RoutePlan, result: ChatResult, queue_seconds: float) -> RouteTrace:
    ttft = result.token_times[0] - result.started if result.token_times else None
    end = result.token_times[-1] if result.token_times else result.started
    return RouteTrace(
        route_requested=route,
        domains_applied=plan.weights,
        gated_off=plan.gated_off,
        router_probabilities=plan.probabilities,
        reason=plan.reason,
        queue_seconds=queue_seconds,
        time_to_first_token_seconds=ttft,
        generation_seconds=max(end - result.started, 0.0),
    )
