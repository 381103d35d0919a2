"""The in-library alternatives to ILF: diffusers' cache hooks on the same frozen backbone.

DiT and PixArt transformers do not inherit diffusers' `CacheMixin`, so the benchmark samples with
a copy of the backbone whose class adds it; TaylorSeer needs its cache identifiers pointed at the
transformer blocks, or it hooks nothing on these models. PyramidAttentionBroadcast and FasterCache
read the current timestep through a callback; FasterCache's classifier-free-guidance cache splits
the batch's unconditional half off the inputs it is told about, so DiT's `class_labels` is added.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.models.cache_utils import CacheMixin

from server.imaging.backbones import ImageBackbone

BLOCKS = [r"^transformer_blocks\.\d+$"]


class CurrentTimestep:
    """What PAB and FasterCache ask for each call: the step's timestep, set by `caching`."""

    def __init__(self) -> None:
        self.value = 1000

    def __call__(self) -> int:
        return self.value


def cache_config(name: str, timestep: CurrentTimestep | None = None):
    kind, value = name.rsplit("-", 1)
    timestep = timestep or CurrentTimestep()
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(value))
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value), disable_cache_before_step=2, max_order=1,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=BLOCKS)
    if kind == "pab":  # recompute self- (and cross-) attention every N steps inside timesteps 100-800
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value),
                                               cross_attention_block_skip_range=2 * int(value),
                                               current_timestep_callback=timestep)
    if kind == "fastercache":  # attention reuse every 2nd step; the unconditional pass every N-th
        return FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=int(value),
                                 tensor_format="BCHW", current_timestep_callback=timestep,
                                 attention_weight_callback=lambda _: 0.5,
                                 _unconditional_conditional_input_kwargs_identifiers=[
                                     "hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                                     "encoder_attention_mask", "class_labels"])
    raise ValueError(f"unknown cache setting {name!r}")


def cache_capable(backbone: ImageBackbone) -> ImageBackbone:
    base = type(backbone.transformer)
    cls = type(f"Cached{base.__name__}", (base, CacheMixin), {})
    transformer = cls.from_config(backbone.transformer.config)
    transformer.load_state_dict(backbone.transformer.state_dict())
    transformer.to(backbone.device).eval().requires_grad_(False)
    return dataclasses.replace(backbone, transformer=transformer, ilf=None)


@contextmanager
def caching(backbone: ImageBackbone, name: str, steps: int):
    """Yields the step_context for `sample`: fresh cache state per image batch, step info per call."""
    transformer = backbone.transformer
    timestep = CurrentTimestep()
    transformer.enable_cache(cache_config(name, timestep))

    def step_context(i: int, t: torch.Tensor):
        timestep.value = int(t)
        if i == 0:
            transformer._reset_stateful_cache()
        return transformer.cache_context("cfg", step_index=i, num_inference_steps=steps, timestep=t)

    try:
        yield step_context
    finally:
        transformer.disable_cache()
