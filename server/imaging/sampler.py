"""The denoising loop: a diffusers scheduler, classifier-free guidance, and the backbone.

Written out (rather than calling DiTPipeline/PixArtAlphaPipeline) because the loop is where the
product works: ILF swaps the model call inside it, and the pipelines hard-code things this server
must not (DiTPipeline's null class 1000 and mandatory VAE).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Literal

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from server.imaging.backbones import ImageBackbone

SchedulerName = Literal["ddim", "dpm++"]


def make_scheduler(name: SchedulerName, config: dict) -> SchedulerMixin:
    """A fresh scheduler per request: schedulers keep per-run state (DPM-Solver's history)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}")


@dataclass(frozen=True)
class SampleJob:
    conditions: list  # class ids (DiT) or prompts (PixArt), one per image
    seeds: list[int]  # one per image: image i depends only on its own seed
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: SchedulerName = "ddim"
    mode: Literal["baseline", "ilf"] = "baseline"
    first_block_cache: float | None = None  # diffusers' FirstBlockCache at this threshold on top; None: off


@dataclass(frozen=True)
class SampleResult:
    images: torch.Tensor  # (n, C, H, W) in [0, 1], on CPU
    steps: int
    block_evaluations: int  # transformer blocks run per image, guidance batched in the same pass
    seconds: float


class FirstBlockCache:
    """diffusers' FirstBlockCache on a backbone's transformer for one batch: a step whose first block's
    residual changed by less than `threshold` (relative) since the last computed step reuses that step's
    residual for the rest of the network, ILF's loop included. The hooks go on when the batch starts
    and off when it ends; the image worker samples one batch at a time, so no other sampling meets
    them. diffusers decides per batch, so a cached image depends on the batch it was sampled in."""

    def __init__(self, transformer: torch.nn.Module, threshold: float):
        self.transformer, self.threshold = transformer, threshold

    def __enter__(self) -> "FirstBlockCache":
        apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=self.threshold))
        self.registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        self.registry.invalidate_child_registries_cache()
        self.head = self.transformer.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
        _set_cache_context(self.transformer, CacheContext("batch"))
        return self

    def computed_last_step(self) -> bool:
        return self.head.state_manager.get_state().should_compute

    def forget(self) -> None:
        """Rows left the batch: the cached residuals have the old rows, so the next step computes."""
        self.registry.reset_stateful_hooks(recurse=True)
        _set_cache_context(self.transformer, CacheContext("batch"))

    def __exit__(self, *exc) -> None:
        self.registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        self.registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
        self.registry.invalidate_child_registries_cache()


def initial_noise(backbone: ImageBackbone, job: SampleJob) -> torch.Tensor:
    """Drawn on the CPU from per-image generators, so a seed gives the same noise on any device."""
    shape = (backbone.latent_channels, job.height // backbone.vae_scale_factor, job.width // backbone.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in job.seeds]
    return torch.stack(noise).to(backbone.device)


@torch.no_grad()
def sample(backbone: ImageBackbone, job: SampleJob,
           step_context: Callable[[int, torch.Tensor], ContextManager] | None = None,
           trajectory: list[torch.Tensor] | None = None,
           progress: Callable[[int, int], None] | None = None) -> SampleResult:
    """The sampling loop; in ILF mode the same loop runs the backbone with its feedback loop inside.

    step_context(i, t), if given, wraps each step: where diffusers' cache hooks learn the step.
    trajectory, if given, receives the starting noise and the sample after every step (ILF's teacher).
    progress(done, steps), if given, is told after each step; an exception it raises (a streaming
    client that has gone) stops the sampling there.
    """
    result = sample_batch(backbone, [job], [progress], step_context, trajectory)[0]
    if isinstance(result, Exception):
        raise result
    return result


def compatible(a: SampleJob, b: SampleJob) -> bool:
    """Jobs that can share a batch: the same loop (mode, steps, scheduler, cache) over latents of one shape."""
    return ((a.mode, a.steps, a.scheduler, a.first_block_cache, a.height, a.width)
            == (b.mode, b.steps, b.scheduler, b.first_block_cache, b.height, b.width))


@torch.no_grad()
def sample_batch(backbone: ImageBackbone, jobs: list[SampleJob],
                 progress: list[Callable[[int, int], None] | None] | None = None,
                 step_context: Callable[[int, torch.Tensor], ContextManager] | None = None,
                 trajectory: list[torch.Tensor] | None = None) -> list[SampleResult | Exception]:
    """Compatible jobs (see `compatible`) sampled as one batch, each with its own seeds, conditions
    and guidance scale; per job its result, or the exception its `progress` raised. A job whose
    `progress` raises leaves the batch there (its rows are dropped, the others go on); the loop ends
    early when every job has left. Written by hand: the diffusers pipelines sample one request."""
    first = jobs[0]
    if any(not compatible(first, job) for job in jobs):
        raise ValueError("jobs in one batch must share mode, steps, scheduler, cache and size")
    if first.mode == "ilf" and backbone.ilf is None:
        raise ValueError(f"{backbone.name} has no ILF module")
    progress = progress or [None] * len(jobs)
    start = time.perf_counter()
    scheduler = make_scheduler(first.scheduler, backbone.scheduler_config)
    scheduler.set_timesteps(first.steps, device=backbone.device)
    outcomes: list[SampleResult | Exception | None] = [None] * len(jobs)
    live = list(range(len(jobs)))  # the jobs still in the batch, in row order

    def rows_of(indices: list[int]) -> tuple[dict, torch.Tensor | None]:
        conditions = [c for i in indices for c in jobs[i].conditions]
        scales = [jobs[i].guidance_scale for i in indices for _ in jobs[i].seeds]
        guided = any(scale > 1.0 for scale in scales)
        cond = backbone.conditioning(conditions, guided)
        return cond, torch.tensor(scales, device=backbone.device).view(-1, 1, 1, 1) if guided else None

    ilf = backbone.ilf if first.mode == "ilf" else None
    x = torch.cat([initial_noise(backbone, jobs[i]) for i in live]) * scheduler.init_noise_sigma
    cond, scales = rows_of(live)
    if trajectory is not None:
        trajectory.append(x)
    blocks_per_step = ilf.config.blocks_per_step if ilf else backbone.num_blocks
    blocks = 0  # per image: a step the cache skips runs the first block alone
    cache = FirstBlockCache(backbone.transformer, first.first_block_cache) if first.first_block_cache else None
    # the cache first: it hooks the backbone's own blocks, which the ILF context then loops
    with cache or nullcontext(), ilf.enabled(backbone.transformer) if ilf else nullcontext():
        for i, t in enumerate(scheduler.timesteps):
            with step_context(i, t) if step_context else nullcontext():
                x = denoise_step(backbone, scheduler, x, t, cond, scales)
            blocks += blocks_per_step if cache is None or cache.computed_last_step() else 1
            if trajectory is not None:
                trajectory.append(x)
            leaving = []
            for j in live:
                try:
                    if progress[j] is not None:
                        progress[j](i + 1, len(scheduler.timesteps))
                except Exception as stop:  # this job's client left or its time ran out: it alone stops
                    outcomes[j] = stop
                    leaving.append(j)
            if leaving:
                owners = [j for j in live for _ in jobs[j].seeds]  # each row's job
                keep = torch.tensor([r for r, j in enumerate(owners) if j not in leaving], device=x.device)
                live = [j for j in live if j not in leaving]
                if not live:
                    break
                x = x[keep]
                drop_rows(scheduler, keep)
                if cache is not None:
                    cache.forget()
                cond, scales = rows_of(live)

    if live:
        images = backbone.decode(x).split([len(jobs[j].seeds) for j in live])
        steps = len(scheduler.timesteps)
        seconds = time.perf_counter() - start
        for j, image in zip(live, images):
            outcomes[j] = SampleResult(image, steps, blocks, seconds)
    return outcomes


def drop_rows(scheduler: SchedulerMixin, keep: torch.Tensor) -> None:
    """Keep only these rows of a scheduler's per-run history (DPM-Solver's previous model outputs)."""
    history = getattr(scheduler, "model_outputs", None)
    if history is not None:
        scheduler.model_outputs = [None if h is None else h[keep] for h in history]


def denoise_step(backbone: ImageBackbone, scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor,
                 cond: dict, guidance_scale: float | torch.Tensor | None) -> torch.Tensor:
    """One scheduler step with classifier-free guidance (what ILF distillation also runs through):
    `guidance_scale` one for all rows, or per row ([rows, 1, 1, 1]; None: no guidance)."""
    guided = isinstance(guidance_scale, torch.Tensor) or (guidance_scale is not None and guidance_scale > 1.0)
    model_in = torch.cat([x, x]) if guided else x
    model_in = scheduler.scale_model_input(model_in, t)
    out = backbone.predict(model_in, t, cond)  # epsilon, x0 or v: the scheduler's config says which
    if guided:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    return scheduler.step(out, t, x, return_dict=False)[0]
