"""Attach the manifest's frozen Brainstacks stacks to the loaded chat base, in domain order.

Stacks load from verified safetensors (sha256 from the manifest) and start gated off: a request
applies the domains its route names, for the duration of that request (`moe_lora.routed`).
"""

from __future__ import annotations

from server.chat.moe_lora import read_stack_metadata, load_stack, set_route
from server.manifest import ArtifactError, ArtifactResolver, ChatSection


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
