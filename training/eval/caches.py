"""The in-library alternatives to ILF: diffusers' cache hooks on the same frozen backbone.

DiT and PixArt transformers do not inherit diffusers' `CacheMixin`, so the benchmark samples with
a copy of the backbone whose class adds it; TaylorSeer needs its cache identifiers pointed at the
transformer blocks, or it hooks nothing on these models.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.models.cache_utils import CacheMixin

from server.imaging.backbones import ImageBackbone

BLOCKS = [r"^transformer_blocks\.\d+$"]


def cache_config(name: str):
    kind, value = name.rsplit("-", 1)
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(value))
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value), disable_cache_before_step=2, max_order=1,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=BLOCKS)
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
    transformer.enable_cache(cache_config(name))

    def step_context(i: int, t: torch.Tensor):
        if i == 0:
            transformer._reset_stateful_cache()
        return transformer.cache_context("cfg", step_index=i, num_inference_steps=steps, timestep=t)

    try:
        yield step_context
    finally:
        transformer.disable_cache()
