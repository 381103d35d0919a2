"""A /generate-image request's way through the server, HTTP aside: plan the sampling job (every
bound checked against the model and the operator's settings, and its cost against its deadline),
then, once the image worker has sampled it, the metrics and the answer (PNG bytes or JSON with
base64 PNGs). A job whose client has gone or whose deadline has passed stops between denoising
steps, or before it starts when it is still queued."""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import numpy as np
import torch
from fastapi.responses import JSONResponse, Response
from PIL import Image

from server.errors import ApiError
from server.imaging.backbones import ImageBackbone
from server.imaging.batching import ImageBatcher
from server.imaging.sampler import SampleJob, SampleResult
from server.metrics import Metrics
from server.schemas.common import MAX_SEED
from server.schemas.images import ImageRequest, ImageResponse
from server.settings import Settings


async def generate(req: ImageRequest, backbone: ImageBackbone, generation: int, service: "ImageService", as_png: bool,
                   disconnected: Callable[[], Awaitable[bool]] | None = None) -> Response:
    """Plan the job, sample it on the image worker (in a batch with others that fit), record it, answer."""
    job = plan_job(req, backbone, service.settings)
    result = await run_job(backbone, job, deadline_of(req, service.settings), service, disconnected)
    record_metrics(service.metrics, backbone, job, result)
    return respond(backbone, job, result, generation, as_png)


class JobStopped(Exception):
    """A sampling job stopped between steps (or before its first): its client left, or its deadline passed."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class JobControl:
    """What the image worker checks before a job and after each of its steps."""
    deadline: float  # time.perf_counter() after which the job stops
    seconds: float  # the deadline as the client gave it
    gone: bool = False

    def check(self, done: int = 0, steps: int = 0) -> None:
        if self.gone:
            raise JobStopped("client gone")
        if time.perf_counter() > self.deadline:
            raise JobStopped("deadline")


def deadline_of(req: ImageRequest, settings: Settings) -> float:
    """Seconds this request may take: the client's `timeout`, within the server's maximum."""
    if req.timeout is not None and req.timeout > settings.image_timeout_seconds:
        raise ApiError(422, f"timeout: at most {settings.image_timeout_seconds:g} s", "timeout")
    return req.timeout or settings.image_timeout_seconds


async def run_job(backbone: ImageBackbone, job: SampleJob, seconds: float, service: "ImageService",
                  disconnected: Callable[[], Awaitable[bool]] | None) -> SampleResult:
    """Sample `job` on the worker, in a batch with the requests that fit (server/imaging/batching.py);
    a client that disconnects, or a deadline that passes, stops it at the next step (or before it
    starts): 499 and 504. It answers as soon as its batch has sampled it, and leaves the engine's queue."""
    estimate = service.costs.estimate(backbone, job)
    if estimate is not None and estimate > seconds:
        raise ApiError(422, f"this request would take about {estimate:.2g} s at the measured speed of "
                            f"{backbone.name}, over its deadline of {seconds:g} s; ask for fewer steps, "
                            f"images or pixels, or a longer timeout", "timeout")
    control = JobControl(time.perf_counter() + seconds, seconds)
    outcome = await queue_job(service.batcher, backbone, job, control.check, control.check)
    try:
        while not outcome.done():
            await asyncio.wait({outcome}, timeout=0.25)
            if not outcome.done() and disconnected is not None and await disconnected():
                control.gone = True
    except asyncio.CancelledError:
        control.gone = True
        raise
    try:
        result = outcome.result()
    except JobStopped as stopped:
        if stopped.reason == "deadline":
            raise ApiError(504, f"the images did not finish within {seconds:g} s", "timeout") from None
        raise ApiError(499, "the client closed the request before its images were ready") from None
    service.costs.record(backbone, job, result.seconds)
    return result


async def queue_job(batcher: ImageBatcher, backbone: ImageBackbone, job: SampleJob, check: Callable[[], None],
                    progress: Callable[[int, int], None]) -> asyncio.Future[SampleResult]:
    """List `job` with the batcher and queue its turn on the image worker; a full queue raises here.
    The future resolves as soon as a batch has sampled the job (its own turn in the queue, if still
    waiting, is then dropped), with its result or the exception that stopped it; `check` runs before
    its batch starts, `progress` after each step (either raising makes it leave)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[SampleResult] = loop.create_future()
    outcome.add_done_callback(lambda f: f.cancelled() or f.exception())  # one nobody awaits is not logged

    def settle(_: object = None) -> None:
        if outcome.done():
            return
        if entry.outcome is None:  # its turn ended without a batch sampling it: the worker failed
            batcher.withdraw(entry)
            if task.cancelled():
                outcome.cancel()
            elif task.exception() is not None:
                outcome.set_exception(task.exception())
            return
        # a turn the worker already took returns the same outcome, retrieved so it is not logged as lost
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        task.cancel()
        if isinstance(entry.outcome, Exception):
            outcome.set_exception(entry.outcome)
        else:
            outcome.set_result(entry.outcome)

    entry = batcher.list(backbone, job, check, progress, lambda: loop.call_soon_threadsafe(settle))
    task = asyncio.ensure_future(batcher.engine.submit(batcher.run, entry, times_queue=False))
    task.add_done_callback(settle)
    await asyncio.sleep(0)  # the engine takes it or refuses it (QueueFull) before its first await
    if task.done() and entry.outcome is None:
        batcher.withdraw(entry)
        task.result()
    return outcome


class SamplingCosts:
    """Seconds per unit of sampling work, per model, from the jobs it finished (a running mean):
    a unit is one block evaluation of one image at the model's native size, counted twice with
    guidance (the unconditional pass rides in the same batch). A job sampled in a batch counts its
    batch's time: the time such a request takes under the same load."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.per_unit: dict[str, float] = {}

    @staticmethod
    def units(backbone: ImageBackbone, job: SampleJob) -> float:
        blocks = backbone.ilf.config.blocks_per_step if job.mode == "ilf" and backbone.ilf else backbone.num_blocks
        pixels = job.height * job.width / backbone.native_size ** 2
        return job.steps * blocks * len(job.seeds) * pixels * (2 if job.guidance_scale > 1.0 else 1)

    def record(self, backbone: ImageBackbone, job: SampleJob, seconds: float) -> None:
        per_unit = seconds / self.units(backbone, job)
        old = self.per_unit.get(backbone.name)
        self.per_unit[backbone.name] = per_unit if old is None else old + self.weight * (per_unit - old)

    def estimate(self, backbone: ImageBackbone, job: SampleJob) -> float | None:
        """Seconds the job would take (None before the model has finished a job)."""
        per_unit = self.per_unit.get(backbone.name)
        return None if per_unit is None else per_unit * self.units(backbone, job)


@dataclass
class ImageService:
    """What image requests run on: the operator's bounds, the batcher in front of the image engine,
    the metrics, and the sampling costs measured on this server's jobs (its deadline estimates)."""

    settings: Settings
    batcher: ImageBatcher
    metrics: Metrics
    costs: SamplingCosts = field(default_factory=SamplingCosts)


def plan_job(req: ImageRequest, backbone: ImageBackbone, settings: Settings) -> SampleJob:
    """Check a request against the model and the operator's bounds; every refusal names its field."""
    guidance = req.guidance_scale if req.guidance_scale is not None else backbone.spec.default_guidance_scale
    mode = req.mode or default_mode(req, backbone, guidance)
    if mode == "ilf" and backbone.ilf is None:
        raise ApiError(422, f"mode: model {backbone.name!r} has no trained ILF module; use mode 'baseline'", "mode")
    if mode == "ilf":
        trained = backbone.ilf.config
        if not trained.serves_guidance(guidance):
            low, high = trained.served_guidance
            raise ApiError(422, f"guidance_scale: the ILF module of {backbone.name} was distilled for guidance "
                                f"{low:g}-{high:g}; use a scale in that range or mode 'baseline'", "guidance_scale")
        steps = req.steps if req.steps is not None else trained.steps
        scheduler = req.scheduler or trained.scheduler
        if steps != trained.steps:
            raise ApiError(422, f"steps: the ILF module of {backbone.name} was trained for {trained.steps} steps; "
                                f"use {trained.steps} or mode 'baseline'", "steps")
        if scheduler != trained.scheduler:
            raise ApiError(422, f"scheduler: the ILF module of {backbone.name} was trained with "
                                f"{trained.scheduler!r}; use it or mode 'baseline'", "scheduler")
    else:
        steps = req.steps if req.steps is not None else backbone.spec.default_steps
        scheduler = req.scheduler or "ddim"
    if steps > settings.max_steps:
        raise ApiError(422, f"steps: at most {settings.max_steps}", "steps")
    if guidance > settings.max_guidance_scale:
        raise ApiError(422, f"guidance_scale: at most {settings.max_guidance_scale}", "guidance_scale")
    if req.n > settings.max_images_per_request:
        raise ApiError(422, f"n: at most {settings.max_images_per_request} images per request", "n")

    height = req.height or backbone.native_size
    width = req.width or backbone.native_size
    # the model's own bound: twice the size it was trained at (beyond, it draws tiles of noise), and
    # the operator's ceiling
    largest = min(settings.max_image_side, 2 * backbone.native_size)
    for param, side in (("height", height), ("width", width)):
        if side > largest:
            raise ApiError(422, f"{param}: at most {largest} pixels for {backbone.name} (native "
                                f"{backbone.native_size})", param)
        if side % backbone.stride:
            raise ApiError(422, f"{param}: must be a multiple of {backbone.stride} for {backbone.name}", param)
    if backbone.square_only and height != width:
        raise ApiError(422, f"{backbone.name} generates square images only", "width")

    threshold = req.first_block_cache if req.first_block_cache is not None else settings.image_first_block_cache
    condition = _condition(req, backbone, settings)
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - settings.max_images_per_request)
    if seed + req.n - 1 > MAX_SEED:
        raise ApiError(422, "seed: seed + n - 1 must fit in 63 bits", "seed")
    return SampleJob(
        conditions=[condition] * req.n,
        seeds=[seed + i for i in range(req.n)],
        steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        scheduler=scheduler,
        mode=mode,
        first_block_cache=threshold or None,
    )


def default_mode(req: ImageRequest, backbone: ImageBackbone, guidance: float) -> str:
    """ILF where the model has a module trained for what the request asks (its steps, scheduler and
    guidance, or no preference); else the baseline sampler, which serves any steps, scheduler and guidance."""
    ilf = backbone.ilf
    if ilf is None or req.steps not in (None, ilf.config.steps) or req.scheduler not in (None, ilf.config.scheduler) \
            or not ilf.config.serves_guidance(guidance):
        return "baseline"
    return "ilf"


def _condition(req: ImageRequest, backbone: ImageBackbone, settings: Settings):
    if backbone.spec.kind == "dit":
        if req.prompt is not None:
            raise ApiError(422, f"{backbone.name} is class-conditional: send class_label, not prompt", "prompt")
        if req.class_label is None:
            raise ApiError(422, f"{backbone.name} needs class_label (an id or one of its class names)", "class_label")
        names = backbone.class_names()
        if isinstance(req.class_label, str):
            if req.class_label not in names:
                raise ApiError(422, f"class_label: unknown class {req.class_label!r}; known: {names}", "class_label")
            return names.index(req.class_label)
        if not 0 <= req.class_label < backbone.num_classes:
            raise ApiError(422, f"class_label: must be in [0, {backbone.num_classes})", "class_label")
        return req.class_label
    if req.class_label is not None:
        raise ApiError(422, f"{backbone.name} is text-conditional: send prompt, not class_label", "class_label")
    if req.prompt is None or not req.prompt.strip():
        raise ApiError(422, f"{backbone.name} needs a non-empty prompt", "prompt")
    if len(req.prompt) > settings.max_prompt_chars:
        raise ApiError(422, f"prompt: at most {settings.max_prompt_chars} characters", "prompt")
    return req.prompt


def record_metrics(metrics: Metrics, backbone: ImageBackbone, job: SampleJob, result: SampleResult) -> None:
    metrics.image_seconds.labels(model=backbone.name, mode=job.mode).observe(result.seconds)
    metrics.images.labels(model=backbone.name, mode=job.mode).inc(len(job.seeds))
    metrics.image_denoise_steps.labels(model=backbone.name, mode=job.mode).inc(result.steps * len(job.seeds))


def respond(backbone: ImageBackbone, job: SampleJob, result: SampleResult, generation: int,
            as_png: bool) -> Response:
    """The PNG itself (a row of them for n > 1), or JSON with base64 PNGs; headers say what ran."""
    images = to_pil(result.images)
    headers = {"X-Loopstack-Mode": job.mode, "X-Loopstack-Seed": str(job.seeds[0]),
               "X-Loopstack-Steps": str(result.steps), "X-Loopstack-Generation": str(generation)}
    if as_png:
        image = images[0] if len(images) == 1 else row_of(images)
        return Response(png_bytes(image), media_type="image/png", headers=headers)
    return JSONResponse(image_response(backbone, job, result, generation, images).model_dump(), headers=headers)


def image_response(backbone: ImageBackbone, job: SampleJob, result: SampleResult, generation: int,
                   images: list[Image.Image] | None = None) -> ImageResponse:
    return ImageResponse(
        model=backbone.name, mode=job.mode, scheduler=job.scheduler, steps=result.steps,
        block_evaluations=result.block_evaluations, first_block_cache=job.first_block_cache,
        guidance_scale=job.guidance_scale, seeds=job.seeds,
        width=job.width, height=job.height, seconds=result.seconds, placeholder=backbone.spec.placeholder,
        generation=generation, images=b64_pngs(images or to_pil(result.images)))


@dataclass(frozen=True)
class Progress:
    step: int
    steps: int
    mode: str


async def start_stream(req: ImageRequest, backbone: ImageBackbone, generation: int,
                       service: ImageService) -> AsyncIterator[Progress | ImageResponse]:
    """Plan the job and queue it now, to be sampled in a batch like any other request (a refusal or
    a full queue raises before any event); then the sampling's progress after each step, and the
    response. Closing the iterator early stops the sampling at its next step."""
    job = plan_job(req, backbone, service.settings)
    loop, steps = asyncio.get_running_loop(), asyncio.Queue()
    seconds = deadline_of(req, service.settings)
    control = JobControl(time.perf_counter() + seconds, seconds)  # a closed stream is a client gone

    def progress(done: int, total: int) -> None:  # on the image worker's thread
        control.check()
        loop.call_soon_threadsafe(steps.put_nowait, Progress(done, total, job.mode))

    outcome = await queue_job(service.batcher, backbone, job, control.check, progress)

    async def events() -> AsyncIterator[Progress | ImageResponse]:
        try:
            while not (outcome.done() and steps.empty()):
                waiter = asyncio.ensure_future(steps.get())
                await asyncio.wait({waiter, outcome}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            try:
                result = outcome.result()
            except JobStopped:
                raise ApiError(504, f"the images did not finish within {seconds:g} s", "timeout") from None
            record_metrics(service.metrics, backbone, job, result)
            yield image_response(backbone, job, result, generation)
        finally:
            control.gone = True  # a job still waiting or sampling stops at its next check

    return events()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def row_of(images: list[Image.Image]) -> Image.Image:
    row = Image.new(images[0].mode, (sum(i.width for i in images), images[0].height))
    x = 0
    for image in images:
        row.paste(image, (x, 0))
        x += image.width
    return row


def b64_pngs(images: list[Image.Image]) -> list[str]:
    return [base64.b64encode(png_bytes(i)).decode() for i in images]
