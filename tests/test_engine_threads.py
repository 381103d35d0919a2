"""The engines' threads live only while there is work (server/engine.py, BusyThread): an idle
engine keeps no thread, and so no OpenMP team that would slow the other engine's parallel regions;
work handed over while a thread is ending never runs beside it."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import torch

from server.engine import WorkerEngine
from server.metrics import Metrics
from tests.test_batching import chat_with_stacks, job, started_engine


def native_threads() -> set[str]:
    """The process's threads as the kernel lists them: Python's and OpenMP's workers alike."""
    return set(os.listdir("/proc/self/task"))


def started_since(before: set[str], seconds: float = 5.0) -> set[str]:
    """The threads started since `before` that are still alive once they had `seconds` to end
    (threads of other tests that end meanwhile do not matter)."""
    deadline = time.monotonic() + seconds
    while (alive := native_threads() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive


def engine_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"engine-{name}" and t.is_alive()]


def parallel_work() -> float:
    """A product big enough that torch runs it as an OpenMP parallel region."""
    a = torch.ones(512, 512)
    return float((a @ a).sum())


def test_an_idle_image_engine_leaves_no_thread_and_no_openmp_team_behind():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a team of workers, whatever this machine's default
    engine = WorkerEngine("image", max_waiting=4, retry_after=1, metrics=Metrics())
    engine.start()
    try:
        before = native_threads()
        assert engine.run(parallel_work) == 512.0 ** 3
        assert not started_since(before)  # the engine's thread and its team both ended
        assert not engine_threads("image")

        async def requests():
            return await asyncio.gather(*(engine.submit(parallel_work) for _ in range(3)))

        assert len(asyncio.run(requests())) == 3  # a new thread started for them
        assert not started_since(before)
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)


def test_work_handed_over_while_the_thread_ends_never_runs_beside_the_work_before_it():
    engine = WorkerEngine("image", max_waiting=64, retry_after=1, metrics=Metrics())
    engine.start()
    spans: list[tuple[float, float, threading.Thread]] = []

    def job() -> None:
        started = time.perf_counter()
        time.sleep(0.002)
        spans.append((started, time.perf_counter(), threading.current_thread()))

    def client() -> None:
        for i in range(20):
            engine.run(job)
            time.sleep(0.002 * (i % 5))  # the engine often goes idle between two jobs, and wakes as it ends

    clients = [threading.Thread(target=client) for _ in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    engine.shutdown()
    spans.sort()
    assert len(spans) == 60
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:]))
    assert len({id(thread) for _, _, thread in spans}) > 1  # threads did end and start again (all still referenced)


def test_the_chat_engine_thread_ends_when_idle_and_the_next_request_starts_another(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    engine = started_engine()
    try:
        first = asyncio.run(engine.submit(chat, job("Hello there", "none")))
        deadline = time.monotonic() + 5
        while engine_threads("chat") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine_threads("chat")
        second = asyncio.run(engine.submit(chat, job("Hello there", "none")))  # owns the model after the first
        assert second.text == first.text and second.completion_tokens == first.completion_tokens
        assert engine.run(lambda: threading.current_thread().name) == "engine-chat"
    finally:
        engine.shutdown()
    try:
        engine.enqueue(chat, job("Hello there", "none"))
    except RuntimeError as exc:
        assert "not running" in str(exc)
    else:
        raise AssertionError("a stopped engine took a request")
