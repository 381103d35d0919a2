"""Domains' frozen stacks as served: each domain's a generation of its own, held outside the shared
base, and a model set's stacks mounted per request.

While serving, the base model's wrapped projections (`StackedMoELoRALinear`) carry no stacks. A
model set (one generation of base, stacks and router) has one `ServedStacks`: its domains' stacks
per projection, with the fused copies and per-route plans its requests build. A request mounts it
for its own steps (`ChatModel.mounted`), so a reload that loads a domain's new stacks never
touches a request still running on the old ones, and the old stacks' memory (fused copies
included) goes with the last model set that refers to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from server.artifacts import ArtifactError
from server.chat.adapters import LoraAdapter
from server.chat.lora_bank import BANKS, add_banked
from server.chat.moe_lora import FusedFrozenStacks, MoELoRA, Weights, StackedMoELoRALinear, route_key, wrapped_layers
from server.chat.stack_files import read_stack, read_stack_metadata

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
Plan = tuple[FusedFrozenStacks | None, torch.Tensor | None]  # a route's fused pass and its weights


@dataclass(frozen=True)
class DomainStacks:
    domain: str
    per_layer: dict[str, list[MoELoRA]]  # wrapped projection -> this domain's frozen stacks, in boosting order
    count: int
    prompt_template: str | None = None  # what the stacks were trained on, when not the chat template


def load_domain_stacks(model: nn.Module, domain: str, paths: list[Path], base: str | None = None) -> DomainStacks:
    """A domain's stack files (verified paths) as frozen modules for the base's wrapped projections;
    the base itself is not touched, so this may run while requests use it. Refuses, naming the
    file, a stack of another domain, one trained on another base (`base`: the served base's name)
    or one that does not fit."""
    layers = wrapped_layers(model)
    like = next(p for p in model.parameters() if p.is_floating_point())
    per_layer: dict[str, list[MoELoRA]] = {name: [] for name in layers}
    templates = set()
    for path in paths:
        meta = read_stack_metadata(path)
        templates.add(meta.get("prompt_template"))
        if len(templates) > 1:
            raise ArtifactError(path, f"was trained with another prompt template than {domain!r}'s other stacks")
        if meta["domain"] != domain:
            raise ArtifactError(path, f"is a stack of domain {meta['domain']!r}, listed under {domain!r}")
        if base is not None and meta.get("base", base) != base:
            raise ArtifactError(path, f"was trained on the base {meta['base']!r}, not on {base!r}")
        _, stacks = read_stack(path, layers, like)
        for name, stack in stacks.items():
            per_layer[name].append(stack)
    return DomainStacks(domain, per_layer, len(paths), templates.pop() if templates else None)


@dataclass
class LayerStacks:
    """The stacks a model set mounts on one projection, and the passes its routes make through them."""

    stacks: list[MoELoRA]
    domains: list[str]  # each stack's domain
    width: int  # the projection's output width
    group: "SharedInputStacks | None" = None  # with the projections that read the same input
    plans: dict[tuple | None, Plan] = field(default_factory=dict)


class ServedStacks:
    """A model set's frozen stacks on the base's wrapped projections (what `StackedProjections`
    mounts for its requests), their fused copies and each route's plan."""

    def __init__(self, layers: dict[str, StackedMoELoRALinear], domains: list[DomainStacks],
                 adapters: list[LoraAdapter] = ()):
        self.domains = tuple(domains)
        self.adapters = tuple(adapters)
        self._fused: dict[tuple, FusedFrozenStacks] = {}
        self._layers: dict[StackedMoELoRALinear, LayerStacks] = {}
        self._loras = {layer: [(a.name, a, name) for a in adapters if name in a.plan] for name, layer in layers.items()}
        self._loras = {layer: loras for layer, loras in self._loras.items() if loras}
        self._adapter_names = {a.name: a for a in adapters}
        for layer, loras in self._loras.items():
            BANKS.register(layer, loras)
        for name, layer in layers.items():
            stacks = [s for d in domains for s in d.per_layer.get(name, [])]
            if stacks:
                names = [d.domain for d in domains for _ in d.per_layer.get(name, [])]
                self._layers[layer] = LayerStacks(stacks, names, layer.out_features)
        for name in layers:
            parent = name.rsplit(".", 1)[0]
            for projections in SHARED_INPUTS:
                members = [self._layers.get(layers.get(f"{parent}.{p}")) for p in projections]
                if name == f"{parent}.{projections[0]}" and all(members):
                    group = SharedInputStacks(self, members)
                    for member in members:
                        member.group = group

    def add(self, layer: StackedMoELoRALinear, x: torch.Tensor, out: torch.Tensor, route: Weights) -> torch.Tensor:
        loras = self._loras.get(layer)
        if loras and route:  # adapters are on only by name (route None: every stack at 1, no adapter)
            out = add_banked(out, x, layer, route, self._adapter_names)
        mine = self._layers.get(layer)
        if mine is None:
            return out
        if mine.group is not None:
            delta = mine.group.delta(mine, x, route)
            return out if delta is None else out + delta.to(out.dtype)
        fused, weights = self.plan(mine, [mine], route, x.device)
        return out if fused is None else out + fused(x, weights).to(out.dtype)

    def plan(self, owner: LayerStacks, members: list[LayerStacks], route: Weights, device: torch.device) -> Plan:
        """This route's pass through `members` (one projection, or a shared-input group), built at its
        first step and reused (a route's key holds its per-row tensors, so an id is never reused)."""
        key = route_key(route)
        plan = owner.plans.get(key)
        if plan is None:
            plan = self._pass(members, route, device)
            if len(owner.plans) >= 32:
                owner.plans.clear()
            owner.plans[key] = plan
        return plan

    def _pass(self, members: list[LayerStacks], route: Weights, device: torch.device) -> Plan:
        """The fused pass a route makes through `members` (their outputs side by side) and its
        weights; (None, None) when no domain is on. Copies are kept per domain and once for all
        domains together, never per set of domains: each batch of rows makes its own set, and copies
        per set grew the server's memory with its traffic. A route of one domain runs its domain's
        copy (a gated-off stack changes nothing, bit for bit); a route of several runs the copy of
        every mounted stack, the domains it leaves off at weight zero (a pass's small operations,
        more than its products, are its cost at small batches)."""
        stacks, weights, outputs, domains = [], [], [], []
        for index, member in enumerate(members):
            for domain, stack in zip(member.domains, member.stacks):
                stacks.append(stack)
                weights.append(1.0 if route is None else route.get(domain, 0.0))
                outputs.append(index)
                domains.append(domain)
        on = {d for d, w in zip(domains, weights) if isinstance(w, torch.Tensor) or w != 0.0}
        if not on:
            return None, None
        if len(on) == 1:
            kept = [i for i, d in enumerate(domains) if d in on]
            stacks, weights, outputs = [stacks[i] for i in kept], [weights[i] for i in kept], [outputs[i] for i in kept]
        grouped = len(members) > 1
        key = (tuple(id(s) for s in stacks), tuple(outputs) if grouped else None)  # the stacks live as long as this
        if key not in self._fused:
            self._fused[key] = FusedFrozenStacks(stacks, outputs if grouped else None,
                                                 [m.width for m in members] if grouped else None)
        fused = self._fused[key]
        return fused, fused.weights(weights, device)


class SharedInputStacks:
    """The mounted stacks of projections that read the same input (a layer's q, k and v; gate and
    up), computed in one fused pass when the first of them is called, each member then taking its
    columns: 2 passes instead of 5 per layer, which is most of the stacks' cost at batch 1 on a CPU
    (each pass is a dozen small operations). Members called with another input (not the same tensor)
    recompute, so a model that feeds them differently stays correct, only slower."""

    def __init__(self, served: ServedStacks, members: list[LayerStacks]):
        self.served = served
        self.members = members
        self._input: torch.Tensor | None = None
        self._deltas: dict[int, torch.Tensor] = {}  # by member index

    def delta(self, member: LayerStacks, x: torch.Tensor, route: Weights) -> torch.Tensor | None:
        """What `member`'s stacks add to its base output for input `x` (None: no stack is on)."""
        index = next(i for i, m in enumerate(self.members) if m is member)
        if x is not self._input or index not in self._deltas:
            fused, weights = self.served.plan(self.members[0], self.members, route, x.device)
            if fused is None:
                return None
            widths = [m.width for m in self.members]
            self._deltas = dict(enumerate(fused(x, weights).split(widths, -1)))
            self._input = x
        delta = self._deltas.pop(index)
        if not self._deltas:
            self._input = None  # every member has its part: hold on to nothing
        return delta
