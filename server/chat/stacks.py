"""A domain's frozen stacks as a generation of their own, held outside the shared base modules.

While serving, the base model's wrapped projections (`StackedMoELoRALinear`) carry no stacks. A
request mounts the stacks of the model set it started on for its own duration (`mounted`), so a
reload that loads a domain's new stacks never touches a request still running on the old ones,
and the old stacks' memory goes once no model set refers to them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch.nn as nn

from server.artifacts import ArtifactError
from server.chat.moe_lora import MoELoRA, read_stack, read_stack_metadata, wrapped_layers


@dataclass(frozen=True)
class DomainStacks:
    domain: str
    per_layer: dict[str, list[MoELoRA]]  # wrapped projection -> this domain's frozen stacks, in boosting order
    count: int


def load_domain_stacks(model: nn.Module, domain: str, paths: list[Path], base: str | None = None) -> DomainStacks:
    """A domain's stack files (verified paths) as frozen modules for the base's wrapped projections;
    the base itself is not touched, so this may run while requests use it. Refuses, naming the
    file, a stack of another domain, one trained on another base (`base`: the served base's name)
    or one that does not fit."""
    layers = wrapped_layers(model)
    like = next(p for p in model.parameters() if p.is_floating_point())
    per_layer: dict[str, list[MoELoRA]] = {name: [] for name in layers}
    for path in paths:
        meta = read_stack_metadata(path)
        if meta["domain"] != domain:
            raise ArtifactError(path, f"is a stack of domain {meta['domain']!r}, listed under {domain!r}")
        if base is not None and meta.get("base", base) != base:
            raise ArtifactError(path, f"was trained on the base {meta['base']!r}, not on {base!r}")
        _, stacks = read_stack(path, layers, like)
        for name, stack in stacks.items():
            per_layer[name].append(stack)
    return DomainStacks(domain, per_layer, len(paths))


@contextmanager
def mounted(model: nn.Module, stacks: list[DomainStacks]) -> Iterator[None]:
    """These domains' stacks (in this order) on the base's wrapped projections, for one request;
    whatever was mounted before comes back afterwards. The projections must be wrapped already."""
    layers = wrapped_layers(model)
    previous = {name: (layer.stacks, layer.stack_domains) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.stacks = nn.ModuleList([s for d in stacks for s in d.per_layer.get(name, [])])
        layer.stack_domains = [d.domain for d in stacks for _ in d.per_layer.get(name, [])]
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.stacks, layer.stack_domains = previous[name]


def forget_fused(model: nn.Module) -> None:
    """Drop the fused copies of frozen stacks that the projections cache (after a generation drained)."""
    for layer in wrapped_layers(model).values():
        layer._fused_cache.clear()
