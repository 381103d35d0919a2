"""Engines: what runs model work, off the event loop, behind a bounded queue.

Every engine has the surface of `Engine`: the app's lifespan starts and stops it, and the registry
warms new artifacts on its worker between jobs (`run`). Two implement it: `WorkerEngine` here (a
queue in front of one worker thread; the image engine, whose batcher groups the jobs waiting in
it) and the chat engine (server/chat/batching.py: continuous batching of decode steps). Each runs
its work on one thread at a time (a `BusyThread`), so jobs for one model set run one at a time
(torch uses the cores inside a job). Past
its queue's bound an engine refuses at once with QueueFull, and the route answers 429 with
Retry-After: the time the queue ahead needs at the measured service rate (`ServiceRate`).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Protocol, TypeVar

from server.metrics import CURRENT_REQUEST, Metrics

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, engine: str, retry_after: int):
        self.engine = engine
        self.retry_after = retry_after
        super().__init__(f"the {engine} engine is busy; retry in {retry_after} s")


class ServiceRate:
    """A running mean of how long a job holds a slot (exponentially weighted, so it follows a
    change of load within a few dozen jobs), and from it when a slot frees for a client now refused."""

    def __init__(self, fallback: int, weight: float = 0.1):
        self.fallback = fallback  # before any job was timed
        self.weight = weight
        self.mean: float | None = None

    def record(self, seconds: float) -> None:
        self.mean = seconds if self.mean is None else self.mean + self.weight * (seconds - self.mean)

    def retry_after(self, ahead: int, slots: int = 1) -> int:
        """Whole seconds until `ahead` jobs have gone through `slots` slots (1 s to 10 min)."""
        if self.mean is None:
            return self.fallback
        return max(1, min(600, math.ceil(self.mean * ahead / slots)))


class BusyThread:
    """An engine's thread, alive only while the engine has work: `loop` returns when it finds none
    (calling `ending` first) and the next job starts a new thread (`wake`), which begins by waiting
    for the one before it to end, so the engine's work never runs on two threads at once. `wake`
    and `ending` are called under the engine's lock, so no job is left without a thread.

    Why not one long-lived thread: torch parallelises on CPU through OpenMP, and libgomp keeps every
    thread that ever ran a parallel region a team of workers for as long as that thread lives.
    While it manages more threads than the machine has CPUs, each worker spins only 100 iterations
    (instead of 300,000) for the next parallel region before it sleeps, so every region of a decode
    step pays a wake-up: on 2 cores the idle image engine's team made the chat engine decode a
    quarter slower (docs/chat.md). A thread that ends takes its team with it."""

    def __init__(self, name: str, loop: Callable[[], None]):
        self.name = name
        self._loop = loop
        self._thread: threading.Thread | None = None
        self._ended: threading.Thread | None = None  # the last thread, which may still be returning

    def wake(self) -> None:
        """A thread for the work just handed over, unless one is running (under the engine's lock)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(self._ended,), name=self.name, daemon=True)
            self._thread.start()

    def ending(self) -> None:
        """The running thread found no work and returns (under the engine's lock)."""
        self._ended, self._thread = self._thread, None

    def join(self, timeout: float) -> None:
        thread = self._thread or self._ended
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, ended: threading.Thread | None) -> None:
        if ended is not None:
            ended.join()
        self._loop()


def fulfil(future: Future, fn: Callable, args: tuple) -> None:
    """Run `fn(*args)` into `future`: its result, or what it raised, for the caller to decide on."""
    try:
        future.set_result(fn(*args))
    except BaseException as exc:
        future.set_exception(exc)


def on_own_thread(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on a thread that ends with it, so that the OpenMP team its torch work starts ends
    too (see `BusyThread`): loading a model on a thread that lives on would slow every engine."""
    future: Future = Future()
    thread = threading.Thread(target=fulfil, args=(future, fn, args), name=getattr(fn, "__name__", "work"))
    thread.start()
    thread.join()
    return future.result()


class Engine(Protocol):
    name: str

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet running."""

    def start(self) -> None:
        """Start the worker (the app's lifespan does, so that building an app runs no thread)."""

    def run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the worker between jobs, from another thread, and wait for it. Not queue-bounded."""

    def shutdown(self) -> None:
        """Stop the worker; what still waits fails."""


class WorkerEngine:
    """A bounded job queue in front of one worker thread (an `Engine`)."""

    def __init__(self, name: str, max_waiting: int, retry_after: int, metrics: Metrics):
        self.name = name
        self.max_waiting = max_waiting
        self.service = ServiceRate(retry_after)
        self._running = metrics.engine_running.labels(engine=name)
        self._waiting = metrics.engine_waiting.labels(engine=name)
        metrics.engine_queue_limit.labels(engine=name).set(max_waiting)
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Callable, tuple, Future]] = deque()
        self._thread = BusyThread(f"engine-{name}", self._work)
        self._started = False
        self._in_system = 0  # running + waiting

    @property
    def waiting(self) -> int:
        return max(self._in_system - 1, 0)

    def start(self) -> None:
        with self._lock:
            self._started = True

    def _hand_over(self, fn: Callable[..., T], *args) -> Future:
        future: Future = Future()
        with self._lock:
            if not self._started:
                raise RuntimeError(f"the {self.name} engine is not running")
            self._jobs.append((fn, args, future))
            self._thread.wake()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread.ending()
                    return
                fn, args, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                fulfil(future, fn, args)

    async def submit(self, fn: Callable[..., T], *args, times_queue: bool = True) -> T:
        """Run `fn(*args)` on the worker when its turn comes. `times_queue=False`: the job tells the
        request its own wait (a batched job starts with its batch, not at its turn)."""
        if not self._started:
            raise RuntimeError(f"the {self.name} engine is not running")
        with self._lock:
            if self._in_system > self.max_waiting:  # one running, max_waiting already queued
                raise QueueFull(self.name, self.service.retry_after(self._in_system))
            self._in_system += 1
            self._publish()
        timing, submitted = CURRENT_REQUEST.get(), time.perf_counter()

        def timed() -> T:
            if timing is not None and times_queue:  # the request's wait, read back by the middleware
                timing.engine = self.name
                timing.queue_seconds += time.perf_counter() - submitted
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.service.record(time.perf_counter() - started)

        try:
            return await asyncio.wrap_future(self._hand_over(timed))
        finally:
            with self._lock:
                self._in_system -= 1
                self._publish()

    def _publish(self) -> None:
        self._running.set(min(self._in_system, 1))
        self._waiting.set(self.waiting)

    def run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the worker from another thread, between jobs, and wait for it (the registry
        warms new artifacts here: they touch modules that running jobs use). Not queue-bounded."""
        return self._hand_over(fn, *args).result()

    def shutdown(self) -> None:
        """Stop taking jobs; those not yet started are cancelled, and the running one is waited for (a
        torch thread still running at interpreter exit aborts the process)."""
        with self._lock:
            self._started = False
            jobs, self._jobs = list(self._jobs), deque()
        for _, _, future in jobs:
            future.cancel()
        self._thread.join(timeout=30)
