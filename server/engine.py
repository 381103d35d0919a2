"""A bounded job queue in front of one model worker thread.

Model work never runs on the event loop: each engine owns one thread, so jobs for one model set
run one at a time (torch uses the cores inside a job). At most `max_waiting` jobs may wait; past
that, `submit` refuses at once with QueueFull and the route answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from server.metrics import CURRENT_REQUEST, Metrics

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, engine: str, retry_after: int):
        self.engine = engine
        self.retry_after = retry_after
        super().__init__(f"the {engine} engine is busy; retry in {retry_after} s")


class Engine:
    def __init__(self, name: str, max_waiting: int, retry_after: int, metrics: Metrics):
        self.name = name
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self._running = metrics.engine_running.labels(engine=name)
        self._waiting = metrics.engine_waiting.labels(engine=name)
        metrics.engine_queue_limit.labels(engine=name).set(max_waiting)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        self._lock = threading.Lock()
        self._in_system = 0  # running + waiting

    @property
    def waiting(self) -> int:
        return max(self._in_system - 1, 0)

    async def submit(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            if self._in_system > self.max_waiting:  # one running, max_waiting already queued
                raise QueueFull(self.name, self.retry_after)
            self._in_system += 1
            self._publish()
        timing, submitted = CURRENT_REQUEST.get(), time.perf_counter()

        def timed() -> T:
            if timing is not None:  # the request's wait, read back by the middleware that counts it
                timing.engine = self.name
                timing.queue_seconds += time.perf_counter() - submitted
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, timed)
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
        return self._executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
