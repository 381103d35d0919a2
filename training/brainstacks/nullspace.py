"""Null-space projection (Brainstacks §3.5): keep a new domain's stacks out of earlier domains' way.

Before a domain trains, the earlier domains' frozen stacks are run on the earlier domains' prompts,
and their summed output delta is collected at every wrapped projection (one row per token, up to
`samples` rows). The top-K right singular vectors V of that matrix (`torch.svd_lowrank`) are the
directions the earlier domains write in; P = V V^T, and the new stack's delta is trained as
delta - delta P (computed as (delta V) V^T: V is thin). K scales with the projection's width and with the number of earlier domains
(`fraction` of the width per domain: the paper's 64 of 3,840 is 1.7%), so later domains keep room.
The authors built P from the *new* domain's data; here it is built from the earlier domains'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.chat.moe_lora import routed, wrapped_layers
from training.brainstacks.data import Batch


@dataclass(frozen=True)
class NullSpaceConfig:
    enabled: bool = True
    fraction: float = 0.017  # directions per earlier domain, as a share of the projection's width
    samples: int = 400  # delta rows per projection (tokens of earlier domains' prompts)
    seed: int = 0


def directions(width: int, earlier_domains: int, cfg: NullSpaceConfig) -> int:
    return min(width - 1, max(1, round(cfg.fraction * width)) * earlier_domains)


@torch.no_grad()
def collect_deltas(model, prompts: list[Batch], earlier: list[str], samples: int,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per wrapped projection: [rows, d_out] of the earlier domains' summed stack deltas."""
    layers = wrapped_layers(model)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []

    def hook(name):
        def capture(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            delta = sum(stack(x) for d, stack in zip(module.stack_domains, module.stacks) if d in earlier)
            rows[name].append(delta.float())
        return capture

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(hook(name)))
    try:
        with routed(model, {d: 1.0 for d in earlier}):
            for batch in prompts:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    mask = torch.cat([b.attention_mask.reshape(-1) for b in prompts]).bool()
    out = {}
    for name, chunks in rows.items():
        matrix = torch.cat(chunks)[mask]  # real tokens only
        pick = torch.randperm(len(matrix), generator=generator)[:samples]
        out[name] = matrix[pick]
    return out


def claimed_bases(model, prompts: list[Batch], earlier: list[str], cfg: NullSpaceConfig) -> list[torch.Tensor | None]:
    """One orthonormal V [d_out, K] per wrapped projection (in model order; P = V V^T), or Nones when
    disabled or when no domain came earlier."""
    layers = wrapped_layers(model)
    if not cfg.enabled or not earlier:
        return [None] * len(layers)
    generator = torch.Generator().manual_seed(cfg.seed)
    deltas = collect_deltas(model, prompts, earlier, cfg.samples, generator)
    out = []
    for name, layer in layers.items():
        k = directions(layer.out_features, len(earlier), cfg)
        torch.manual_seed(cfg.seed)  # svd_lowrank draws a random sketch
        _, _, v = torch.svd_lowrank(deltas[name], q=min(k + 8, min(deltas[name].shape)), niter=4)
        out.append(v[:, :k].contiguous().to(next(layer.stacks[0].parameters()).dtype))
    return out
