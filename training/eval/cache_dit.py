"""cache-dit's DBCache on the same frozen backbone, for the image yardstick.

Setting "F{Fn}B{Bn}[W{warm-up}]-{threshold}", e.g. "F1B0-0.1": each step runs the first Fn blocks,
and when their residual changed by less than the threshold (relative mean absolute difference over
the whole batch) since the last computed step, reuses that step's residual for the middle blocks
and runs only the last Bn; the first W steps (cache-dit's default, 8) always compute. With W = 1 and
Bn = 0 it is FirstBlockCache (the same images and skips).

cache-dit runs here on a bare transformer (a `BlockAdapter` without a pipeline): it counts one step
per transformer call, so `refresh_context` starts each batch afresh and every step checks that its
count agrees with the loop's. DiT needs cache-dit's `DiTPatchFunctor` (its forward reads the first
block's embedding, which cache-dit's block swap hides); `disable_cache` restores the forward it
found, the functor's, so the functor's attributes are removed too, leaving the transformer as it was.
"""

from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager

import torch

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # it logs every call at INFO otherwise
import cache_dit  # noqa: E402
from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern  # noqa: E402
from cache_dit.caching.patch_functors import DiTPatchFunctor  # noqa: E402

from server.imaging.backbones import ImageBackbone  # noqa: E402

SETTING = re.compile(r"^F(\d+)B(\d+)(?:W(\d+))?-([0-9.]+)$")


def dbcache_config(setting: str, steps: int) -> DBCacheConfig:
    match = SETTING.match(setting)
    if not match:
        raise ValueError(f"unknown DBCache setting {setting!r} (e.g. 'F1B0-0.1')")
    fn, bn, warmup, threshold = int(match[1]), int(match[2]), int(match[3] or 8), float(match[4])
    return DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=threshold,
                         max_warmup_steps=warmup, num_inference_steps=steps,
                         enable_separate_cfg=False)  # guidance is batched: one transformer call a step


@contextmanager
def dbcache(backbone: ImageBackbone, setting: str, steps: int):
    """Yields the step_context for `sample`, like `caches.caching`; runs on the backbone itself (the
    DiT functor patches diffusers' own classes only, not `cache_capable`'s subclass)."""
    transformer = backbone.transformer
    config = dbcache_config(setting, steps)
    if config.Fn_compute_blocks + config.Bn_compute_blocks > len(transformer.transformer_blocks):
        raise ValueError(f"{setting}: Fn + Bn exceeds {backbone.name}'s {len(transformer.transformer_blocks)} blocks")
    adapter = BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                           blocks_name="transformer_blocks",
                           forward_pattern=ForwardPattern.Pattern_3,  # hidden_states in, hidden_states out
                           patch_functor=DiTPatchFunctor() if backbone.spec.kind == "dit" else None,
                           check_forward_pattern=True)
    cache_dit.enable_cache(adapter, cache_config=copy.deepcopy(config))

    @contextmanager
    def step_context(i: int, t: torch.Tensor):
        if i == 0:
            cache_dit.refresh_context(transformer, cache_config=copy.deepcopy(config))
        yield
        counted = transformer._context_manager.get_context(transformer._context_names[0]).get_current_step()
        if counted != i:
            raise RuntimeError(f"DBCache counted step {counted}, the sampling loop is at {i}")

    try:
        yield step_context
    finally:
        cache_dit.disable_cache(adapter)
        for name in ("forward", "_is_patched", "_norm1_emb"):
            if name in vars(transformer) or name in transformer._modules:
                delattr(transformer, name)
