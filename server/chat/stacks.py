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
from server.chat.moe_lora import (
    SHARED_INPUTS, MoELoRA, SharedInputStacks, read_stack, read_stack_metadata, wrapped_layers,
)


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


def _mount_plan(model: nn.Module, stacks: list[DomainStacks]) -> tuple[object, list[tuple]]:
    """Per wrapped projection, the module list, domains and shared-input group that mounting these
    stacks installs, built once per set of stacks (the engine mounts its set at every decode step)
    and kept on the model with the stacks it refers to, so their ids are not reused while it lives."""
    plans = model.__dict__.setdefault("_mount_plans", {})
    key = tuple(id(d) for d in stacks)
    if key not in plans:
        if len(plans) >= 8:
            plans.pop(next(iter(plans)))
        layers = wrapped_layers(model)
        per_layer = {name: (nn.ModuleList([s for d in stacks for s in d.per_layer.get(name, [])]),
                            [d.domain for d in stacks for _ in d.per_layer.get(name, [])]) for name in layers}
        groups: dict[str, SharedInputStacks] = {}
        for name in layers:
            parent = name.rsplit(".", 1)[0]
            for projections in SHARED_INPUTS:
                names = [f"{parent}.{p}" for p in projections]
                if name == names[0] and all(n in layers and len(per_layer[n][0]) for n in names):
                    group = SharedInputStacks([layers[n] for n in names])
                    groups.update({n: group for n in names})
        plans[key] = (tuple(stacks), object(), [(*per_layer[name], groups.get(name)) for name in layers])
    _, token, per_layer = plans[key]
    return token, per_layer


def _install(layer: nn.Module, modules: nn.ModuleList, domains: list[str], group: SharedInputStacks | None,
             token: object | None) -> None:
    # straight into the module's dicts: nn.Module.__setattr__ costs microseconds, x 210 projections x 2 per step
    layer._modules["stacks"] = modules
    layer.__dict__["stack_domains"] = domains
    layer.__dict__["input_group"] = group
    layer.__dict__["mount_token"] = token


@contextmanager
def mounted(model: nn.Module, stacks: list[DomainStacks]) -> Iterator[None]:
    """These domains' stacks (in this order) on the base's wrapped projections, for one request;
    whatever was mounted before comes back afterwards. The projections must be wrapped already."""
    layers = list(wrapped_layers(model).values())
    token, per_layer = _mount_plan(model, stacks)
    previous = [(layer.stacks, layer.stack_domains, layer.input_group, layer.mount_token) for layer in layers]
    for layer, (modules, domains, group) in zip(layers, per_layer):
        _install(layer, modules, domains, group, token)
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            _install(layer, *state)


def forget_fused(model: nn.Module) -> None:
    """Drop the fused copies of frozen stacks that the projections cache (after a generation drained)."""
    model.__dict__.pop("_mount_plans", None)
    for layer in wrapped_layers(model).values():
        layer._fused_cache.clear()
        layer._plans.clear()
