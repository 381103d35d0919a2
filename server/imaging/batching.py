"""Batching of concurrent image requests, written by hand: the diffusers pipelines sample one request,
and no library batches diffusion requests with their own seeds, guidance and cancellation.

Every request still goes through the image engine's bounded queue (its 429s and Retry-After stay as
they are) and is also listed here. When the worker reaches a request still listed, it takes with it
every listed request for the same model (the same loaded generation, ILF module included) whose
job is compatible (mode, steps, scheduler, cache, size), up to `max_images` images. With fewer listed, and
when requests came while the worker was busy (concurrent traffic), it waits up to `window` seconds
for more to join; a lone client's request, listed with the worker idle, never waits. The batch is
sampled as one (`sample_batch`); each request answers when its batch is done, and its own turn in
the queue, if the worker reaches it, just returns the result. Each request keeps its own checks:
one whose client has gone or whose deadline has passed never starts, or leaves the batch between
steps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from server.engine import WorkerEngine
from server.imaging.backbones import ImageBackbone
from server.imaging.sampler import SampleJob, SampleResult, compatible, sample_batch
from server.metrics import CURRENT_REQUEST, Metrics, RequestTiming


@dataclass(eq=False)
class Listed:
    """A request waiting in the image engine, as its batch will sample it."""

    backbone: ImageBackbone
    job: SampleJob
    check: Callable[[], None] | None  # before sampling: raises to keep it from starting
    progress: Callable[[int, int], None] | None  # after each step: raises to make it leave
    on_done: Callable[[], None] | None  # told on the worker once `outcome` is set
    timing: RequestTiming | None  # the request's, told its wait when its batch starts
    listed_at: float
    outcome: SampleResult | Exception | None = None

    def finish(self, outcome: SampleResult | Exception) -> None:
        self.outcome = outcome
        if self.on_done is not None:
            self.on_done()


class ImageBatcher:
    def __init__(self, engine: WorkerEngine, max_images: int, window: float, metrics: Metrics):
        self.engine = engine  # the image engine, whose worker samples the batches
        self.max_images = max_images
        self.window = window
        self._listed: list[Listed] = []
        self._changed = threading.Condition()
        self._sampling = False  # a batch is on the worker
        self._came_while_busy = 0  # requests listed while the worker was busy, since the last collection
        self._batch_images = metrics.image_batch_images
        self._batch_wait = metrics.image_batch_wait

    def list(self, backbone: ImageBackbone, job: SampleJob, check: Callable[[], None] | None = None,
             progress: Callable[[int, int], None] | None = None, on_done: Callable[[], None] | None = None) -> Listed:
        """List a request before it enters the engine's queue."""
        entry = Listed(backbone, job, check, progress, on_done, CURRENT_REQUEST.get(), time.perf_counter())
        with self._changed:
            if self._sampling or self._listed:
                self._came_while_busy += 1
            self._listed.append(entry)
            self._changed.notify_all()
        return entry

    def withdraw(self, entry: Listed) -> None:
        """A request that never reached the worker (refused by a full queue, or cancelled)."""
        with self._changed:
            if entry in self._listed:
                self._listed.remove(entry)

    def run(self, entry: Listed) -> SampleResult:
        """On the image worker: `entry`'s result, sampling its batch first unless it already ran."""
        if entry.outcome is None:
            self._sample(self._collect(entry))
        if isinstance(entry.outcome, Exception):
            raise entry.outcome
        return entry.outcome

    def _collect(self, first: Listed) -> list[Listed]:
        started = time.perf_counter()
        with self._changed:
            window = self.window if self._came_while_busy else 0.0
            self._came_while_busy = 0
            while True:
                batch, images = [first], len(first.job.seeds)
                for entry in self._listed:
                    fits = images + len(entry.job.seeds) <= self.max_images
                    if entry is not first and fits and entry.backbone is first.backbone \
                            and compatible(entry.job, first.job):
                        batch.append(entry)
                        images += len(entry.job.seeds)
                left = window - (time.perf_counter() - started)
                if images >= self.max_images or left <= 0:
                    break
                self._changed.wait(left)
            for entry in batch:
                if entry in self._listed:
                    self._listed.remove(entry)
        self._batch_wait.observe(time.perf_counter() - started)
        return batch

    def _sample(self, batch: list[Listed]) -> None:
        starting, now = [], time.perf_counter()
        for entry in batch:
            if entry.timing is not None:
                entry.timing.engine = self.engine.name
                entry.timing.queue_seconds += now - entry.listed_at
            try:
                if entry.check is not None:
                    entry.check()
                starting.append(entry)
            except Exception as stop:  # its client left or its time ran out while it waited
                entry.finish(stop)
        if not starting:
            return
        self._batch_images.observe(sum(len(e.job.seeds) for e in starting))
        self._sampling = True
        try:
            outcomes = sample_batch(starting[0].backbone, [e.job for e in starting], [e.progress for e in starting])
        except Exception as error:  # the batch failed as a whole: every request in it gets the error
            outcomes = [error] * len(starting)
        finally:
            self._sampling = False
        for entry, outcome in zip(starting, outcomes):
            entry.finish(outcome)
