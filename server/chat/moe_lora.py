"""MoE-LoRA stacks over a frozen (4-bit) causal LM: Brainstacks §3.1-3.2 (arXiv 2604.01152).

No library does this, so it is written here, in PEFT's wrap-and-add shape: every targeted
projection of every decoder layer becomes a `StackedMoELoRALinear` that keeps the frozen base layer
and a list of stacks, and returns

    y = base(x) + sum over stacks j of  w_domain(j) * MoELoRA_j(x)

One `MoELoRA` is one stack on one projection: N LoRA experts (A Kaiming-uniform, B zero, so a new
stack is an exact no-op), the rsLoRA scale alpha/sqrt(r), and a noisy top-k router (noise only in
training). Its Switch load-balancing loss N * sum_e f_e P_e is kept on the module with its graph,
so its gradient reaches the router (the authors' code computes it on detached tensors).
Training and serving share this file; the per-domain weights `w` come from the meta-router.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from server.artifacts import ArtifactError, read_config, save_with_config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


class MoELoRA(nn.Module):
    """One stack on one projection: a router and N rank-r LoRA experts."""

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
        self.noise = nn.Linear(d_in, n, bias=False)
        nn.init.zeros_(self.noise.weight)
        # orthonormal [d_out, k] basis of directions this stack may not write (null-space training);
        # kept as a basis, not as P = V V^T: a d_out x d_out product per token would cost more than the base
        self.register_buffer("output_basis", None, persistent=False)
        # orthonormal [d_in, k] basis of input directions this stack may not read (input-side null space)
        self.register_buffer("input_basis", None, persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.last_routing: torch.Tensor | None = None  # [tokens, experts] gate weights, for utilisation
        self.frozen_token: object | None = None  # set by freeze(): identifies these exact frozen weights

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Top-k softmax gates per token, [tokens, experts] (zero outside the top k)."""
        logits = self.router(x)
        if self.training:
            logits = logits + F.softplus(self.noise(x)) * torch.randn_like(logits)
        top, index = logits.topk(self.config.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, index, top.softmax(-1))
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
        n, r = self.config.experts, self.config.rank
        if self.input_basis is not None:  # x (I - U U^T) feeds the experts; the router still sees x
            x = x - (x @ self.input_basis) @ self.input_basis.T
        hidden = (x @ self.lora_A.reshape(n * r, -1).T).view(-1, n, r) * gates.unsqueeze(-1)
        delta = hidden.reshape(-1, n * r) @ self.lora_B.permute(0, 2, 1).reshape(n * r, -1)
        delta = delta * self.config.scale
        if self.output_basis is not None:  # delta (I - V V^T)
            delta = delta - (delta @ self.output_basis) @ self.output_basis.T
        return delta.view(*shape[:-1], -1)


class StackedMoELoRALinear(nn.Module):
    """A frozen base projection plus the stacks of every domain, each weighted by its domain's route."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.stacks = nn.ModuleList()
        self.stack_domains: list[str] = []
        # None: every stack at weight 1 (ungated); a domain's weight is a float for the whole batch
        # or a [batch] tensor, one weight per sequence (a batch of mixed routes)
        self.route: dict[str, float | torch.Tensor] | None = None
        self._fused_cache: dict[tuple, FusedFrozenStacks] = {}
        # set while a serving set's frozen stacks are mounted (server/chat/stacks.py): the fused
        # stacks and weights of each route are then built once and reused at every step
        self.mount_token: object | None = None
        self.input_group: SharedInputStacks | None = None  # with the projections that read the same input
        self._plans: dict[tuple, tuple[FusedFrozenStacks | None, torch.Tensor | None]] = {}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.stacks:
            return out
        if self.mount_token is not None:  # serving: every mounted stack is frozen
            if self.input_group is not None:
                delta = self.input_group.delta(self, x)
                return out if delta is None else out + delta.to(out.dtype)
            fused, weights = self._mounted_plan(x.device)
            return out if fused is None else out + fused(x, weights).to(out.dtype)
        frozen, weights = [], []
        for domain, stack in zip(self.stack_domains, self.stacks):
            weight = 1.0 if self.route is None else self.route.get(domain, 0.0)
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
            fused = fused_copy(self._fused_cache, frozen)
            out = out + fused(x, fused.weights([w.view(-1) if isinstance(w, torch.Tensor) else w
                                                for w in weights], x.device)).to(out.dtype)
        return out

    def _mounted_plan(self, device: torch.device) -> tuple["FusedFrozenStacks | None", torch.Tensor | None]:
        """This route's fused pass through the mounted stacks, and its weights: built at the first step
        of a route and reused (a route's key holds its per-sequence tensors, so an id is never reused)."""
        key = (self.mount_token, route_key(self.route))
        plan = self._plans.get(key)
        if plan is None:
            plan = mounted_pass(self._fused_cache, self.route, [self], device)
            if len(self._plans) >= 32:
                self._plans.clear()
            self._plans[key] = plan
        return plan


class FusedFrozenStacks:
    """Frozen stacks of one projection as two matmuls for all of them (the routers' and the A
    matrices' rows in one, then B), instead of a dozen small operations per stack: with a few
    domains on, that overhead dominated a training step (0.40 s with one stack, 0.83 s with two
    frozen ones more) and a decode step."""

    def __init__(self, stacks: list["MoELoRA"], outputs: list[int] | None = None, widths: list[int] | None = None):
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


def fused_copy(cache: dict[tuple, FusedFrozenStacks], frozen: list["MoELoRA"], outputs: list[int] | None = None,
               widths: list[int] | None = None, limit: int | None = 8) -> FusedFrozenStacks:
    """The fused copy of these frozen stacks, from `cache` (at most `limit` sets; the oldest goes
    first): one copy per set of stacks, shared by every route that turns the set on. Routes are many
    (each batch of rows has its own per-sequence weights), sets are few."""
    tokens = tuple(stack.frozen_token for stack in frozen)  # unique per freeze: never stale
    if None in tokens:  # a stack still training: its weights change, no copy of them is kept
        return FusedFrozenStacks(frozen, outputs, widths)
    key = (tokens, None if outputs is None else tuple(outputs))
    if key not in cache:
        if limit is not None and len(cache) >= limit:
            cache.pop(next(iter(cache)))
        cache[key] = FusedFrozenStacks(frozen, outputs, widths)
    return cache[key]


def mounted_pass(cache: dict[tuple, FusedFrozenStacks], route, members: list["StackedMoELoRALinear"],
                 device: torch.device | str) -> tuple[FusedFrozenStacks | None, torch.Tensor | None]:
    """The fused pass a route makes through the mounted stacks of `members` (one projection, or a
    shared-input group whose outputs sit side by side) and its weights; (None, None) when no domain
    is on. Copies are cached per domain and once for all domains together, never per set of domains:
    each batch of rows makes its own set, and copies per set grew the server's memory with its
    traffic. A route of one domain runs its domain's copy (a gated-off stack changes nothing, bit for
    bit); a route of several runs the copy of every mounted stack, the domains it leaves off at weight
    zero (a pass's small operations, more than its products, are its cost at small batches)."""
    stacks, weights, outputs, domains = [], [], [], []
    for index, member in enumerate(members):
        for domain, stack in zip(member.stack_domains, member.stacks):
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
    fused = fused_copy(cache, stacks, outputs if grouped else None, [m.out_features for m in members] if grouped
                       else None, limit=None)
    return fused, fused.weights(weights, device)


def route_key(route: dict[str, float | torch.Tensor] | None) -> tuple | None:
    """A route as a dict key: floats by value, per-sequence tensors by identity (the key holds them,
    so an id is never reused while it is cached)."""
    return None if route is None else tuple(route.items())


class SharedInputStacks:
    """The mounted stacks of projections that read the same input (a layer's q, k and v; gate and
    up), computed in one fused pass when the first of them is called, each member then taking its
    columns: 2 passes instead of 5 per layer, which is most of the stacks' cost at batch 1 on a CPU
    (each pass is a dozen small operations). Members called with another input (not the same tensor)
    recompute, so a model that feeds them differently stays correct, only slower. The fused copies
    live on the first member, shared by every group of these projections (one per set of domains
    mounted)."""

    def __init__(self, members: list[StackedMoELoRALinear]):
        self.members = members
        self._plans: dict[tuple, tuple[FusedFrozenStacks | None, torch.Tensor | None]] = {}
        self._input: torch.Tensor | None = None
        self._deltas: dict[StackedMoELoRALinear, torch.Tensor] = {}

    def delta(self, member: StackedMoELoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """What `member`'s stacks add to its base output for input `x` (None: no stack is on)."""
        if x is not self._input or member not in self._deltas:
            fused, weights = self._plan(member.route, x.device)
            if fused is None:
                return None
            widths = [m.out_features for m in self.members]
            self._deltas = dict(zip(self.members, fused(x, weights).split(widths, -1)))
            self._input = x
        delta = self._deltas.pop(member)
        if not self._deltas:
            self._input = None  # every member has its part: hold on to nothing
        return delta

    def _plan(self, route, device) -> tuple[FusedFrozenStacks | None, torch.Tensor | None]:
        key = route_key(route)
        plan = self._plans.get(key)
        if plan is None:
            plan = mounted_pass(self.members[0]._fused_cache, route, self.members, device)
            if len(self._plans) >= 32:
                self._plans.clear()
            self._plans[key] = plan
        return plan


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def wrapped_layers(model: nn.Module) -> dict[str, StackedMoELoRALinear]:
    """The model's wrapped projections by name; remembered by `wrap_projections` (walking a 30-layer
    model's modules takes ~10 ms, and serving asks at every decode step)."""
    known = model.__dict__.get("_wrapped_layers")
    if known is not None:
        return known
    return {name: m for name, m in model.named_modules() if isinstance(m, StackedMoELoRALinear)}


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


def wrap_projections(model: nn.Module, targets: tuple[str, ...] = PROJECTIONS) -> dict[str, StackedMoELoRALinear]:
    """Replace each targeted projection of every decoder layer by a StackedMoELoRALinear (idempotent)."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                child = getattr(parent, name, None)
                if child is not None and not isinstance(child, StackedMoELoRALinear):
                    setattr(parent, name, StackedMoELoRALinear(child))
    model.__dict__.pop("_wrapped_layers", None)
    model.__dict__["_wrapped_layers"] = wrapped_layers(model)
    return wrapped_layers(model)


def disable_cpu_weight_packing(model: nn.Module) -> None:
    """bitsandbytes' CPU fast path repacks 4-bit weights after an eval-mode, no-grad forward and has
    no autograd kernel: later training then silently loses the gradient through the base. Turn it off
    before training (serving may keep it)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def add_stack(model: nn.Module, domain: str, config: MoELoRAConfig, seed: int = 0) -> list[MoELoRA]:
    """A fresh, trainable stack of `domain` on every projection it covers (an exact no-op until
    trained), in model order."""
    wrap_projections(model, config.targets)
    layers = covered_layers(model, config)
    torch.manual_seed(seed)
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    added = []
    for layer in layers.values():
        # eval mode until a trainer switches it: no router noise unless training asks for it
        stack = MoELoRA(layer.in_features, layer.out_features, config).to(param.device, dtype).eval()
        layer.stacks.append(stack)
        layer.stack_domains.append(domain)
        added.append(stack)
    return added


def freeze(stacks: list[MoELoRA]) -> None:
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


def aux_loss(stacks: list[MoELoRA]) -> torch.Tensor:
    """The load-balancing loss of the last forward, averaged over the wrapped projections."""
    losses = [s.aux_loss for s in stacks if s.aux_loss is not None]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def set_route(model: nn.Module, route: dict[str, float] | None) -> None:
    """Per-domain weights on every wrapped projection ({}: base alone; None: every stack at 1)."""
    for layer in wrapped_layers(model).values():
        layer.__dict__["route"] = route  # a plain attribute: skips nn.Module's __setattr__, per step


@contextmanager
def routed(model: nn.Module, route: dict[str, float] | None) -> Iterator[None]:
    """Apply per-domain weights for the duration of one request, then restore the previous ones."""
    layers = list(wrapped_layers(model).values())
    previous = [layer.route for layer in layers]
    set_route(model, route)
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.__dict__["route"] = old


# ---------------------------------------------------------------- artifacts
def stack_modules(model: nn.Module, domain: str, index: int) -> dict[str, MoELoRA]:
    """The `index`-th stack of `domain` on every wrapped projection it covers, keyed by the projection's name."""
    out = {}
    for name, layer in wrapped_layers(model).items():
        if mine := [s for d, s in zip(layer.stack_domains, layer.stacks) if d == domain]:
            out[name] = mine[index]
    return out


def save_stack(path: Path, modules: dict[str, MoELoRA], domain: str, config: MoELoRAConfig,
               extra: dict | None = None) -> None:
    tensors = {}
    for name, stack in modules.items():
        for key in ("lora_A", "lora_B"):
            tensors[f"{name}.{key}"] = getattr(stack, key)
        tensors[f"{name}.router"] = stack.router.weight
        tensors[f"{name}.noise"] = stack.noise.weight
    save_with_config(path, tensors, "moe_lora", {"domain": domain, "config": asdict(config), **(extra or {})})


def read_stack_metadata(path: Path) -> dict:
    meta = read_config(path, "moe_lora", "MoE-LoRA stack")
    try:
        meta["config"] = MoELoRAConfig(**{**meta["config"], "targets": tuple(meta["config"]["targets"])})
        return meta
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(path, f"not a MoE-LoRA stack ({exc})") from exc


def load_stack(model: nn.Module, path: Path) -> dict:
    """Append a saved stack (frozen) to the model; refuses, naming the file, one that does not fit."""
    meta = read_stack_metadata(path)
    added = add_stack(model, meta["domain"], meta["config"])
    try:
        _copy_from_file(path, covered_layers(model, meta["config"]), added)
    except ArtifactError:
        remove_last_stack(model, meta["domain"])
        raise
    freeze(added)
    return meta


def read_stack(path: Path, layers: dict[str, StackedMoELoRALinear], like: torch.Tensor) -> tuple[dict, dict[str, MoELoRA]]:
    """A saved stack as frozen modules for those of these projections it covers (device and float
    dtype of `like`), keyed by projection, attached to nothing: loading it leaves the model untouched."""
    meta = read_stack_metadata(path)
    layers = covered(layers, meta["config"])
    stacks = [MoELoRA(layer.in_features, layer.out_features, meta["config"]).to(like.device, like.dtype).eval()
              for layer in layers.values()]
    _copy_from_file(path, layers, stacks)
    freeze(stacks)
    return meta, dict(zip(layers, stacks))


def _copy_from_file(path: Path, layers: dict[str, StackedMoELoRALinear], stacks: list[MoELoRA]) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            expected = {f"{name}.{k}" for name in layers for k in ("lora_A", "lora_B", "router", "noise")}
            if keys != expected:
                raise ValueError(f"{len(keys ^ expected)} tensors differ from this model's wrapped projections")
            with torch.no_grad():
                for name, stack in zip(layers, stacks):
                    for key, target in (("lora_A", stack.lora_A), ("lora_B", stack.lora_B),
                                        ("router", stack.router.weight), ("noise", stack.noise.weight)):
                        tensor = f.get_tensor(f"{name}.{key}")
                        if tensor.shape != target.shape:
                            raise ValueError(f"{name}.{key} has shape {tuple(tensor.shape)}, "
                                             f"expected {tuple(target.shape)}")
                        target.copy_(tensor)
    except (ValueError, OSError) as exc:
        raise ArtifactError(path, f"does not fit this model: {exc}") from exc


def remove_last_stack(model: nn.Module, domain: str) -> None:
    for layer in wrapped_layers(model).values():
        if domain not in layer.stack_domains:
            continue  # a projection the domain's stacks do not cover
        index = max(i for i, d in enumerate(layer.stack_domains) if d == domain)
        del layer.stacks[index]
        del layer.stack_domains[index]


def batch_route(routes: list[dict[str, float] | None], domains: tuple[str, ...],
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One route per sequence as a single route of per-sequence weights, so that prompts routed
    differently run as one batch (None in the list: every stack at 1). A domain no sequence uses is
    left out, so its stacks are skipped."""
    weights = {d: [1.0 if r is None else float(r.get(d, 0.0)) for r in routes] for d in domains}
    return {d: torch.tensor(w, device=device) for d, w in weights.items() if any(w)}
