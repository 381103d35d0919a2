"""Attach the manifest's frozen Brainstacks stacks (and its meta-router) to the loaded chat base.

Stacks load from verified safetensors (sha256 from the manifest) and start gated off: a request
applies the domains its route names, for the duration of that request (`moe_lora.routed`).
"""

from __future__ import annotations

from server.chat.moe_lora import load_stack, read_stack_metadata, set_route
from server.chat.router import MetaRouter, load_router
from server.manifest import ArtifactResolver, ChatSection
from server.artifacts import ArtifactError


def attach_stacks(model, section: ChatSection, resolver: ArtifactResolver) -> dict[str, int]:
    """Load every domain's stacks onto `model`; returns the number of stacks per domain."""
    loaded: dict[str, int] = {}
    for domain in section.domains:  # the manifest keeps them in curriculum order
        for artifact in domain.stacks:
            path = resolver.artifact(artifact)
            if (found := read_stack_metadata(path)["domain"]) != domain.name:
                raise ArtifactError(path, f"is a stack of domain {found!r}, listed under {domain.name!r}")
            load_stack(model, path)
        loaded[domain.name] = len(domain.stacks)
    set_route(model, {})  # base alone until a request routes
    return loaded


def load_chat_router(path, section: ChatSection, chat) -> MetaRouter:
    """The meta-router, refused (naming the file) unless it reads this base and routes these domains."""
    router, _ = load_router(path)
    config = chat.model.config
    if router.config.hidden_size != config.hidden_size or router.config.middle_layer > config.num_hidden_layers:
        raise ArtifactError(path, f"router reads width {router.config.hidden_size}, layer {router.config.middle_layer}; "
                                  f"the base has width {config.hidden_size}, {config.num_hidden_layers} layers")
    if unknown := set(router.config.domains) - {d.name for d in section.domains}:
        raise ArtifactError(path, f"router routes domains the manifest does not serve: {sorted(unknown)}")
    return router.to(chat.device)
