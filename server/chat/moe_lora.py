"""MoE-LoRA stacks over a frozen (4-bit) causal LM, as served: Brainstacks §3.1-3.2 (arXiv 2604.01152).

No library does this, so it is written here, in PEFT's wrap-and-add shape: every targeted
projection of every decoder layer becomes a `StackedMoELoRALinear` that keeps the frozen base layer
and returns

    y = base(x) + sum over stacks j of  w_domain(j) * MoELoRA_j(x)

The stacks and the per-domain weights `w` are whatever is mounted on the model's
`StackedProjections`: a model set's frozen stacks for one request while serving
(server/chat/stacks.py), the stacks being trained while training (training/brainstacks/stacks.py).
One `MoELoRA` is one stack on one projection: N LoRA experts and a top-k router, with the rsLoRA
scale alpha/sqrt(r). Its training-only parts (router noise, the load-balancing loss, null-space
projections, freezing) live in training/brainstacks/stacks.py; stack files in stack_files.py.
"""

from __future__ import annotations

import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.nn as nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Weights = dict[str, float | torch.Tensor] | None  # per-domain weights (a [batch] tensor: one per row); None: all at 1


@dataclass(frozen=True)
class MoELoRAConfig:
    experts: int = 4
    rank: int = 16
    alpha: float = 16.0
    top_k: int = 2
    aux_weight: float = 0.01  # Switch load-balancing loss weight
    targets: tuple[str, ...] = PROJECTIONS
    # the share of decoder layers, from the top, that carry a stack: training then back-propagates
    # through those only (on SmolLM2, stacks on the upper 15 of 30 layers halve a CPU training step)
    upper_layers: float = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank)  # rsLoRA: stable as the rank grows

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k {self.top_k} must lie in 1..{self.experts}")
        if unknown := set(self.targets) - set(PROJECTIONS):
            raise ValueError(f"unknown projections {sorted(unknown)}")
        if not 0.0 < self.upper_layers <= 1.0:
            raise ValueError(f"upper_layers {self.upper_layers} must lie in (0, 1]")


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over each token's top-k router logits, zero elsewhere: [tokens, experts], and the
    experts chosen [tokens, k]."""
    top, index = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, top.softmax(-1)), index


class MoELoRA(nn.Module):
    """One stack on one projection: a router and N rank-r LoRA experts (A Kaiming-uniform, B zero,
    so a new stack is an exact no-op)."""

    def __init__(self, d_in: int, d_out: int, config: MoELoRAConfig):
        super().__init__()
        self.config = config
        n, r = config.experts, config.rank
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(n, d_out, r))
        for a in self.lora_A:  # each expert's A as nn.Linear would initialise it
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.router = nn.Linear(d_in, n, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.noise = nn.Linear(d_in, n, bias=False)  # the router's noise in training; kept in the file, unused here
        nn.init.zeros_(self.noise.weight)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Top-k softmax gates per token, [tokens, experts] (zero outside the top k)."""
        return top_k_gates(self.router(x), self.config.top_k)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.lora_A.dtype)
        return self.experts(x, self.gates(x)).view(*shape[:-1], -1)

    def experts(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_e gate_e * B_e A_e x, times the scale: [tokens, d_out] from x [tokens, d_in]."""
        n, r = self.config.experts, self.config.rank
        hidden = (x @ self.lora_A.reshape(n * r, -1).T).view(-1, n, r) * gates.unsqueeze(-1)
        delta = hidden.reshape(-1, n * r) @ self.lora_B.permute(0, 2, 1).reshape(n * r, -1)
        return delta * self.config.scale


class FusedFrozenStacks:
    """Frozen stacks of one projection as two matmuls for all of them (the routers' and the A
    matrices' rows in one, then B), instead of a dozen small operations per stack: with a few
    domains on, that overhead dominated a training step (0.40 s with one stack, 0.83 s with two
    frozen ones more) and a decode step."""

    def __init__(self, stacks: list[MoELoRA], outputs: list[int] | None = None, widths: list[int] | None = None):
        """`outputs`: for stacks of several projections that read one input (of widths `widths`), each
        stack's projection (0, 1, ...); their B matrices then sit block-diagonally, each writing its
        projection's columns (all the projections' columns, whether or not a stack writes them)."""
        configs = {(s.config.experts, s.config.rank, s.config.top_k) for s in stacks}
        if len(configs) != 1:
            raise ValueError("fused stacks must share experts, rank and top_k")
        (self.experts, self.rank, self.top_k), = configs
        n, r = self.experts, self.rank
        self.stacks = len(stacks)
        routers = torch.cat([s.router.weight for s in stacks])  # [S*n, d_in]
        lora_A = torch.cat([s.lora_A.reshape(n * r, -1) for s in stacks])  # [S*n*r, d_in]
        self.router_and_A = torch.cat([routers, lora_A]).detach()
        blocks = [s.lora_B.detach().permute(0, 2, 1).reshape(n * r, -1) for s in stacks]  # [n*r, d_out] each
        if outputs is None:
            self.lora_B = torch.cat(blocks)
        else:
            starts = [sum(widths[:o]) for o in range(len(widths))]
            self.lora_B = blocks[0].new_zeros(len(stacks) * n * r, sum(widths))
            for i, (o, block) in enumerate(zip(outputs, blocks)):
                self.lora_B[i * n * r:(i + 1) * n * r, starts[o]:starts[o] + widths[o]] = block
        self.scale = torch.tensor([s.config.scale for s in stacks], dtype=self.lora_B.dtype)

    def weights(self, weights: list[float | torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """One weight per stack (a float, or a [batch] tensor: one per sequence) times its scale:
        [stacks], or [batch, stacks]."""
        scale = self.scale.to(device)
        if not any(isinstance(w, torch.Tensor) for w in weights):
            return scale * torch.tensor(weights, dtype=scale.dtype, device=device)
        batch = next(w.numel() for w in weights if isinstance(w, torch.Tensor))
        columns = [w.reshape(-1).to(device, scale.dtype) if isinstance(w, torch.Tensor)
                   else torch.full((batch,), float(w), device=device, dtype=scale.dtype) for w in weights]
        return torch.stack(columns, 1) * scale

    def __call__(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`x` [batch, ..., d_in]; `weights` from `weights()`, per sequence or for all."""
        x = x.to(self.lora_B.dtype)
        stacks, n, r = self.stacks, self.experts, self.rank
        both = x @ self.router_and_A.T
        logits = both[..., :stacks * n].unflatten(-1, (stacks, n))
        top, index = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter_(-1, index, top.softmax(-1))
        if weights.dim() == 2:  # [batch, stacks]: each sequence's own
            weights = weights.view(weights.shape[0], *[1] * (x.dim() - 2), stacks)
        gates = gates * weights.unsqueeze(-1)
        hidden = both[..., stacks * n:].unflatten(-1, (stacks, n, r)) * gates.unsqueeze(-1)
        return hidden.flatten(-3) @ self.lora_B


class MountedStacks(Protocol):
    """Stacks mounted on a base's wrapped projections: what each projection adds to its base output."""

    def add(self, layer: "StackedMoELoRALinear", x: torch.Tensor, out: torch.Tensor, route: Weights) -> torch.Tensor:
        """`out` (the base's output for `x`) plus this layer's stacks at the route's weights."""


class StackedMoELoRALinear(nn.Module):
    """A frozen base projection plus whatever stacks are mounted on its model, weighted by the route."""

    def __init__(self, base_layer: nn.Module, projections: "StackedProjections"):
        super().__init__()
        self.base_layer = base_layer
        self.projections = projections  # a plain attribute (not a module): shared by every wrapped projection

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        mounted = self.projections.stacks
        return out if mounted is None else mounted.add(self, x, out, self.projections.route)


class StackedProjections:
    """A base model's wrapped projections (by name) and what is mounted on them: one set of stacks
    and the route that weights them. `mounted` and `routed` are contexts that restore what was there
    before; `attach` mounts for good (the stacks a training run adds to). The model belongs to one
    thread at a time (the chat engine's, once it `claim`s it): mounting from another thread, or from
    two threads at once, raises instead of mixing requests' stacks."""

    def __init__(self) -> None:
        self.layers: dict[str, StackedMoELoRALinear] = {}
        self.stacks: MountedStacks | None = None
        self.route: Weights = None
        self._owner: threading.Thread | None = None
        self._user: int | None = None  # the thread inside a mount or route, while one is
        self._depth = 0

    def claim(self) -> None:
        """From now on only the calling thread may mount or route (the chat engine, on its thread)."""
        current = threading.current_thread()
        if self._owner is not None and self._owner is not current and self._owner.is_alive():
            raise RuntimeError(f"this model's stacks are owned by thread {self._owner.name!r}")
        self._owner = current

    def attach(self, stacks: MountedStacks | None) -> None:
        self._check()
        self.stacks = stacks

    @contextmanager
    def mounted(self, stacks: MountedStacks | None, route: Weights) -> Iterator[None]:
        """These stacks at this route, for the duration of the block."""
        self._enter()
        previous = self.stacks, self.route
        self.stacks, self.route = stacks, route
        try:
            yield
        finally:
            self.stacks, self.route = previous
            self._leave()

    @contextmanager
    def routed(self, route: Weights) -> Iterator[None]:
        """The mounted stacks at this route ({}: the base alone; None: every stack at 1)."""
        self._enter()
        previous, self.route = self.route, route
        try:
            yield
        finally:
            self.route = previous
            self._leave()

    def _check(self) -> None:
        me = threading.get_ident()
        if self._owner is not None and self._owner.ident != me and self._owner.is_alive():
            raise RuntimeError(f"stacks mounted from thread {threading.current_thread().name!r}; "
                               f"thread {self._owner.name!r} owns this model")
        if self._depth and self._user != me:
            raise RuntimeError("two threads mount stacks on one model at once")

    def _enter(self) -> None:
        self._check()
        self._user = threading.get_ident()
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._user = None


def stacked_projections(model: nn.Module) -> StackedProjections:
    """The model's wrapped projections and their mount (`wrap_projections` made them)."""
    projections = getattr(model, "stacked_projections", None)
    if projections is None:
        raise ValueError("the model's projections are not wrapped (wrap_projections)")
    return projections


def routed(model: nn.Module, route: Weights):
    """Apply per-domain weights to the mounted stacks for a block ({}: base alone; None: all at 1)."""
    return stacked_projections(model).routed(route)


def wrapped_layers(model: nn.Module) -> dict[str, StackedMoELoRALinear]:
    """The model's wrapped projections by name."""
    projections = getattr(model, "stacked_projections", None)
    if projections is not None:
        return projections.layers
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedMoELoRALinear)}


def wrap_projections(model: nn.Module, targets: tuple[str, ...] = PROJECTIONS) -> dict[str, StackedMoELoRALinear]:
    """Replace each targeted projection of every decoder layer by a StackedMoELoRALinear (idempotent)."""
    model.requires_grad_(False)
    projections = getattr(model, "stacked_projections", None) or StackedProjections()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                child = getattr(parent, name, None)
                if child is not None and not isinstance(child, StackedMoELoRALinear):
                    setattr(parent, name, StackedMoELoRALinear(child, projections))
    projections.layers = {name: m for name, m in model.named_modules() if isinstance(m, StackedMoELoRALinear)}
    model.stacked_projections = projections
    return projections.layers


def _layer_index(projection: str) -> int:
    match = re.search(r"layers\.(\d+)\.", projection)  # model.layers.{i}.self_attn.q_proj
    return int(match.group(1)) if match else 0


def covered(layers: dict[str, StackedMoELoRALinear], config: MoELoRAConfig) -> dict[str, StackedMoELoRALinear]:
    """Those of a model's wrapped projections (all of them, by name) that a stack of this shape sits on."""
    count = 1 + max(map(_layer_index, layers), default=-1)
    first = count - math.ceil(config.upper_layers * count)
    return {name: m for name, m in layers.items()
            if name.rsplit(".", 1)[-1] in config.targets and _layer_index(name) >= first}


def covered_layers(model: nn.Module, config: MoELoRAConfig) -> dict[str, StackedMoELoRALinear]:
    return covered(wrapped_layers(model), config)


def batch_route(routes: list[dict[str, float] | None], domains: tuple[str, ...],
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One route per sequence as a single route of per-sequence weights, so that prompts routed
    differently run as one batch (None in the list: every stack at 1). A domain no sequence uses is
    left out, so its stacks are skipped."""
    weights = {d: [1.0 if r is None else float(r.get(d, 0.0)) for r in routes] for d in domains}
    return {d: torch.tensor(w, device=device) for d, w in weights.items() if any(w)}


def route_key(route: Weights) -> tuple | None:
    """A route as a dict key: floats by value, per-sequence tensors by identity (the key holds them,
    so an id is never reused while it is cached)."""
    return None if route is None else tuple(route.items())
