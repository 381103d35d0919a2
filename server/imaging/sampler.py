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


@dataclass(frozen=True)
class SampleResult:
    images: torch.Tensor  # (n, C, H, W) in [0, 1], on CPU
    steps: int
    block_evaluations: int  # transformer blocks run per image, guidance batched in the same pass
    seconds: float


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
    if job.mode == "ilf" and backbone.ilf is None:
        raise ValueError(f"{backbone.name} has no ILF module")
    start = time.perf_counter()
    scheduler = make_scheduler(job.scheduler, backbone.scheduler_config)
    scheduler.set_timesteps(job.steps, device=backbone.device)
    guided = job.guidance_scale > 1.0
    cond = backbone.conditioning(job.conditions, guided)

    ilf = backbone.ilf if job.mode == "ilf" else None
    x = initial_noise(backbone, job) * scheduler.init_noise_sigma
    if trajectory is not None:
        trajectory.append(x)
    with ilf.enabled(backbone.transformer) if ilf else nullcontext():
        for i, t in enumerate(scheduler.timesteps):
            with step_context(i, t) if step_context else nullcontext():
                x = denoise_step(backbone, scheduler, x, t, cond, job.guidance_scale)
            if trajectory is not None:
                trajectory.append(x)
            if progress is not None:
                progress(i + 1, len(scheduler.timesteps))

    images = backbone.decode(x)
    steps = len(scheduler.timesteps)
    blocks_per_step = ilf.config.blocks_per_step if ilf else backbone.num_blocks
    return SampleResult(images, steps, steps * blocks_per_step, time.perf_counter() - start)


def denoise_step(backbone: ImageBackbone, scheduler: SchedulerMixin, x: torch.Tensor, t: torch.Tensor,
                 cond: dict, guidance_scale: float) -> torch.Tensor:
    """One scheduler step with classifier-free guidance (what ILF distillation also runs through)."""
    guided = guidance_scale > 1.0
    model_in = torch.cat([x, x]) if guided else x
    model_in = scheduler.scale_model_input(model_in, t)
    out = backbone.predict(model_in, t, cond)  # epsilon, x0 or v: the scheduler's config says which
    if guided:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    return scheduler.step(out, t, x, return_dict=False)[0]
