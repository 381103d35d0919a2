"""Null-space training (Brainstacks §3.5): keep a new domain's stacks out of earlier domains' way.

Two ways of confining a new stack, measured against each other by `training eval brainstacks`:

- "output" (the paper's): before a domain trains, the earlier domains' frozen stacks are run on the
  earlier domains' prompts and their summed output delta is collected at every wrapped projection.
  The top-K right singular vectors V of that matrix are the directions the earlier domains write
  in; the new stack's delta is trained as delta - (delta V) V^T, so it never writes there.
- "input" (GPM / InfLoRA style): the earlier domains' *inputs* to every wrapped projection are
  collected instead; with U their top-K singular directions, the new stack reads x - (x U) U^T, so
  on the earlier domains' prompts (whose inputs lie mostly in U) it stays close to silent.

K scales with the projection's width and with the number of earlier domains (`fraction` of the
width per domain: the paper's 64 of 3,840 is 1.7%), so later domains keep room. The paper built
P from the *new* domain's data; here it is built from the earlier domains'. Freezing folds either
projection into the stack's weights (stacks.freeze).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.chat.moe_lora import MoELoRAConfig, covered_layers, routed
from training.brainstacks.stacks import training_stacks
from training.brainstacks.data import Batch

MODES = ("output", "input", "off")


@dataclass(frozen=True)
class NullSpaceConfig:
    mode: str = "output"
    fraction: float = 0.017  # directions per earlier domain, as a share of the projection's width
    samples: int = 400  # rows per projection (tokens of earlier domains' prompts)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"null-space mode {self.mode!r} is not one of {MODES}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def directions(width: int, earlier_domains: int, cfg: NullSpaceConfig) -> int:
    return min(width - 1, max(1, round(cfg.fraction * width)) * earlier_domains)


@torch.no_grad()
def collect_rows(model, prompts: list[Batch], earlier: list[str], samples: int, generator: torch.Generator,
                 side: str, stack: MoELoRAConfig) -> dict[str, torch.Tensor]:
    """Per projection that stacks of shape `stack` cover, up to `samples` real-token rows, with the
    earlier domains' stacks on: side "output": [rows, d_out] of their summed deltas; side "input":
    [rows, d_in] of the projection's inputs."""
    layers = covered_layers(model, stack)
    library = training_stacks(model)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []

    def hook(name):
        def capture(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            if side == "input":
                rows[name].append(x.float())
            else:
                delta = sum(stack(x) for d, stack in library.of(module) if d in earlier)
                rows[name].append(delta.float())
        return capture

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(hook(name)))
    device = next(model.parameters()).device
    try:
        with routed(model, {d: 1.0 for d in earlier}):
            for batch in prompts:
                batch = batch.to(device)
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    mask = torch.cat([b.attention_mask.reshape(-1) for b in prompts]).bool().to(device)
    out = {}
    for name, chunks in rows.items():
        matrix = torch.cat(chunks)[mask]  # real tokens only
        pick = torch.randperm(len(matrix), generator=generator)[:samples].to(device)
        out[name] = matrix[pick]
    return out


def collect_deltas(model, prompts: list[Batch], earlier: list[str], samples: int,
                   generator: torch.Generator, stack: MoELoRAConfig) -> dict[str, torch.Tensor]:
    return collect_rows(model, prompts, earlier, samples, generator, "output", stack)


def claimed_bases(model, prompts: list[Batch], earlier: list[str], cfg: NullSpaceConfig,
                  stack: MoELoRAConfig) -> dict[str, torch.Tensor]:
    """One orthonormal basis per projection that stacks of shape `stack` cover: V [d_out, K] for
    "output", U [d_in, K] for "input"; none when off or when no domain came earlier."""
    if not cfg.enabled or not earlier:
        return {}
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = collect_rows(model, prompts, earlier, cfg.samples, generator, cfg.mode, stack)
    out = {}
    library = training_stacks(model)
    for name, layer in covered_layers(model, stack).items():
        width = layer.out_features if cfg.mode == "output" else layer.in_features
        k = directions(width, len(earlier), cfg)
        torch.manual_seed(cfg.seed)  # svd_lowrank draws a random sketch
        _, _, v = torch.svd_lowrank(rows[name], q=min(k + 8, min(rows[name].shape)), niter=4)
        out[name] = v[:, :k].contiguous().to(library.of(layer)[0][1].lora_A.dtype)
    return out
