"""MoE-LoRA stacks while they train: Brainstacks §3.2-3.3 (arXiv 2604.01152), the training half.

`TrainableMoELoRA` is the served `MoELoRA` (server/chat/moe_lora.py) plus what only training needs:
noisy top-k routing and its Switch load-balancing loss N * sum_e f_e P_e (kept on the module with
its graph, so its gradient reaches the router; the authors' code computes it on detached tensors),
the null-space bases a stack may not read or write (nullspace.py) and freezing, which folds those
bases into its weights. `TrainingStacks` holds every stack of a training run on the base's wrapped
projections, mounted for good: each adds its output at its domain's weight in the route, trainable
stacks one by one, frozen ones fused (FusedFrozenStacks).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from server.artifacts import ArtifactError
from server.chat.moe_lora import (
    FusedFrozenStacks, MoELoRA, MoELoRAConfig, Weights, StackedMoELoRALinear, covered_layers, stacked_projections,
    top_k_gates, wrap_projections, wrapped_layers,
)
from server.chat.stack_files import copy_stack_weights, read_stack_metadata


class TrainableMoELoRA(MoELoRA):
    def __init__(self, d_in: int, d_out: int, config: MoELoRAConfig):
        super().__init__(d_in, d_out, config)
        # orthonormal [d_out, k] basis of directions this stack may not write (null-space training);
        # kept as a basis, not as P = V V^T: a d_out x d_out product per token would cost more than the base
        self.register_buffer("output_basis", None, persistent=False)
        # orthonormal [d_in, k] basis of input directions this stack may not read (input-side null space)
        self.register_buffer("input_basis", None, persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.last_routing: torch.Tensor | None = None  # [tokens, experts] gate weights, for utilisation
        self.frozen_token: object | None = None  # set by freeze(): identifies these exact frozen weights

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        if self.training:
            logits = logits + F.softplus(self.noise(x)) * torch.randn_like(logits)
        gates, index = top_k_gates(logits, self.config.top_k)
        if self.training:
            # Switch: f_e = share of routed (token, slot) pairs, P_e = mean router probability
            share = torch.zeros_like(logits).scatter(-1, index, 1.0).mean(0) / self.config.top_k
            self.aux_loss = self.config.experts * (share.detach() * logits.softmax(-1).mean(0)).sum()
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.lora_A.dtype)
        gates = self.gates(x)
        self.last_routing = gates.detach()
        if self.input_basis is not None:  # x (I - U U^T) feeds the experts; the router still sees x
            x = x - (x @ self.input_basis) @ self.input_basis.T
        delta = self.experts(x, gates)
        if self.output_basis is not None:  # delta (I - V V^T)
            delta = delta - (delta @ self.output_basis) @ self.output_basis.T
        return delta.view(*shape[:-1], -1)


class TrainingStacks:
    """Every stack of a training run, per wrapped projection, in the order they were added."""

    def __init__(self) -> None:
        self.per_layer: dict[StackedMoELoRALinear, list[tuple[str, TrainableMoELoRA]]] = {}
        self._fused: dict[StackedMoELoRALinear, dict[tuple, FusedFrozenStacks]] = {}

    def of(self, layer: StackedMoELoRALinear) -> list[tuple[str, TrainableMoELoRA]]:
        """(domain, stack) on this projection, in the order they were added."""
        return self.per_layer.get(layer, [])

    def add(self, layer: StackedMoELoRALinear, x: torch.Tensor, out: torch.Tensor, route: Weights) -> torch.Tensor:
        frozen, weights = [], []
        for domain, stack in self.of(layer):
            weight = 1.0 if route is None else route.get(domain, 0.0)
            if isinstance(weight, torch.Tensor):  # per sequence (not tested for all zeros: no device sync)
                weight = weight.to(x.device, torch.float32).view(-1, *[1] * (x.dim() - 1))
            elif weight == 0.0:
                continue  # skipped, not multiplied by zero: a gated-off stack changes nothing, bit for bit
            if stack.frozen_token is not None:
                frozen.append(stack)
                weights.append(weight)
            else:
                out = out + (weight * stack(x)).to(out.dtype)
        if len(frozen) == 1:
            out = out + (weights[0] * frozen[0](x)).to(out.dtype)
        elif frozen:
            fused = self._fused_copy(layer, frozen)
            out = out + fused(x, fused.weights([w.view(-1) if isinstance(w, torch.Tensor) else w
                                                for w in weights], x.device)).to(out.dtype)
        return out

    def _fused_copy(self, layer: StackedMoELoRALinear, frozen: list[TrainableMoELoRA]) -> FusedFrozenStacks:
        """One fused copy per set of frozen stacks (at most 8 a projection; the oldest goes first),
        keyed by their freeze tokens: a stack removed and replaced is never served from a stale copy."""
        cache = self._fused.setdefault(layer, {})
        key = tuple(stack.frozen_token for stack in frozen)
        if key not in cache:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[key] = FusedFrozenStacks(frozen)
        return cache[key]


def training_stacks(model: nn.Module) -> TrainingStacks:
    """The stacks training adds to this (wrapped) model, mounted on its projections for good."""
    projections = stacked_projections(model)
    if not isinstance(projections.stacks, TrainingStacks):
        projections.attach(TrainingStacks())
    return projections.stacks


def add_stack(model: nn.Module, domain: str, config: MoELoRAConfig, seed: int = 0) -> list[TrainableMoELoRA]:
    """A fresh, trainable stack of `domain` on every projection it covers (an exact no-op until
    trained), in model order."""
    wrap_projections(model, config.targets)
    library = training_stacks(model)
    layers = covered_layers(model, config)
    torch.manual_seed(seed)
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    added = []
    for layer in layers.values():
        # eval mode until a trainer switches it: no router noise unless training asks for it
        stack = TrainableMoELoRA(layer.in_features, layer.out_features, config).to(param.device, dtype).eval()
        library.per_layer.setdefault(layer, []).append((domain, stack))
        added.append(stack)
    return added


def freeze(stacks: list[TrainableMoELoRA]) -> None:
    """Freeze a trained stack: no gradients, eval mode (no router noise), a null-space projection
    folded into its weights (output side into B, input side into A)."""
    for stack in stacks:
        if stack.output_basis is not None:
            with torch.no_grad():  # B_k <- (I - V V^T) B_k: writes at inference what it was trained to write
                v = stack.output_basis
                stack.lora_B.sub_(v @ (v.T @ stack.lora_B))  # [E, d_out, r], batched over experts
            stack.output_basis = None
        if stack.input_basis is not None:
            with torch.no_grad():  # A_k <- A_k (I - U U^T)
                u = stack.input_basis
                stack.lora_A.sub_((stack.lora_A @ u) @ u.T)  # [E, r, d_in]
            stack.input_basis = None
        stack.requires_grad_(False).eval()
        for param in stack.parameters():
            param.grad = None
        stack.aux_loss = None
        stack.frozen_token = object()


def aux_loss(stacks: list[TrainableMoELoRA]) -> torch.Tensor:
    """The load-balancing loss of the last forward, averaged over the wrapped projections."""
    losses = [s.aux_loss for s in stacks if s.aux_loss is not None]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def stack_modules(model: nn.Module, domain: str, index: int) -> dict[str, TrainableMoELoRA]:
    """The `index`-th stack of `domain` on every wrapped projection it covers, keyed by the projection's name."""
    library = training_stacks(model)
    out = {}
    for name, layer in wrapped_layers(model).items():
        if mine := [s for d, s in library.of(layer) if d == domain]:
            out[name] = mine[index]
    return out


def remove_last_stack(model: nn.Module, domain: str) -> None:
    library = training_stacks(model)
    for layer, stacks in library.per_layer.items():
        indices = [i for i, (d, _) in enumerate(stacks) if d == domain]
        if indices:  # else a projection the domain's stacks do not cover
            del stacks[indices[-1]]


def load_stack(model: nn.Module, path: Path) -> dict:
    """Append a saved stack (frozen) to the model's training stacks; refuses, naming the file, one
    that does not fit."""
    meta = read_stack_metadata(path)
    added = add_stack(model, meta["domain"], meta["config"])
    try:
        copy_stack_weights(path, covered_layers(model, meta["config"]), added)
    except ArtifactError:
        remove_last_stack(model, meta["domain"])
        raise
    freeze(added)
    return meta
