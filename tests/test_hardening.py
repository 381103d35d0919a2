"""Bounded work: deadlines, abandoned and queued jobs, the cost estimate, size bounds, slow clients
and overload, on the tiny zoo (the sampler slowed per step where a test needs time to act)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from server.app import create_app
from server.imaging import batching as image_batching
from server.imaging import sampler as image_sampler
from tests.conftest import assert_error_shape, live_server, make_settings, per_job

STEP_SECONDS = 0.3


class SlowSampler:
    """The real sampler with each denoising step taking at least STEP_SECONDS; records when steps end."""

    def __init__(self):
        self.real = image_sampler.sample
        self.steps: list[float] = []
        self.jobs = 0

    def __call__(self, backbone, job, progress=None):
        self.jobs += 1

        def slow(done, total):
            time.sleep(STEP_SECONDS)
            self.steps.append(time.perf_counter())
            if progress is not None:
                progress(done, total)

        return self.real(backbone, job, progress=slow)


@pytest.fixture
def slow_sampler(monkeypatch) -> SlowSampler:
    sampler = SlowSampler()
    monkeypatch.setattr(image_batching, "sample_batch", per_job(sampler))
    return sampler


@pytest.fixture
def fresh_client(client):
    """The session's app with no sampling cost measured yet: no estimate from other tests."""
    client.app.state.services.images.costs.per_unit.clear()
    return client


def test_a_request_past_its_deadline_stops_between_steps_with_504(fresh_client, slow_sampler):
    response = fresh_client.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "steps": 20,
                                                    "timeout": 1.0})
    assert_error_shape(response, 504, "timeout")
    done = len(slow_sampler.steps)
    assert 2 <= done <= 5  # stopped at the first step past 1 s, not after 20
    time.sleep(2 * STEP_SECONDS)
    assert len(slow_sampler.steps) == done  # and nothing ran on after the answer


def test_a_queued_request_whose_deadline_passes_never_starts(fresh_client, slow_sampler):
    first = {}
    worker = threading.Thread(target=lambda: first.update(r=fresh_client.post(
        "/generate-image", json={"model": "tiny-dit", "class_label": 1, "steps": 6})))
    worker.start()
    while not slow_sampler.steps:  # the first job holds the worker
        time.sleep(0.01)
    late = fresh_client.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, "steps": 2, "timeout": 0.5})
    worker.join(timeout=30)
    assert first["r"].status_code == 200
    assert_error_shape(late, 504, "timeout")
    assert slow_sampler.jobs == 1  # the late one was dropped when the worker reached it


def test_a_request_that_cannot_finish_in_time_is_refused_up_front(fresh_client, slow_sampler):
    body = {"model": "tiny-dit", "class_label": 1, "steps": 2}
    assert fresh_client.post("/generate-image", json=body).status_code == 200  # the model's speed, measured
    started = time.perf_counter()
    refused = fresh_client.post("/generate-image", json=body | {"steps": 60, "n": 8, "timeout": 2.0})
    assert_error_shape(refused, 422, "timeout")
    assert "about" in refused.json()["error"]["message"]
    assert time.perf_counter() - started < STEP_SECONDS and slow_sampler.jobs == 1  # nothing sampled
    # within the estimate it runs
    assert fresh_client.post("/generate-image", json=body | {"timeout": 30.0}).status_code == 200


def test_a_timeout_over_the_servers_maximum_and_sizes_past_the_models_are_refused(client):
    error = assert_error_shape(client.post("/generate-image", json={"model": "tiny-dit", "class_label": 1,
                                                                    "timeout": 301}), 422, "timeout")
    assert "300" in error["message"]
    # tiny-dit is 16 px: twice that is the bound, whatever the operator's ceiling (1024)
    assert client.post("/generate-image", json={"model": "tiny-pixart", "prompt": "a seven", "steps": 1,
                                                "height": 32, "width": 32}).status_code == 200
    error = assert_error_shape(client.post("/generate-image", json={"model": "tiny-pixart", "prompt": "a seven",
                                                                    "height": 40, "width": 32}), 422, "height")
    assert "at most 32" in error["message"]


def test_an_abandoned_request_stops_within_one_step(manifest_path, slow_sampler):
    settings = make_settings(manifest_path)
    with live_server(create_app(settings, load_in_background=False), settings) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": "tiny-dit", "class_label": 1, "steps": 40}).encode()
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(b"POST /generate-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            while len(slow_sampler.steps) < 2:
                time.sleep(0.01)
        left = time.perf_counter()
        time.sleep(8 * STEP_SECONDS)
        after = [t for t in slow_sampler.steps if t > left]
        # the server polls for the disconnect every 0.25 s; the step in progress then ends the job
        assert len(after) <= 2, (len(after), len(slow_sampler.steps))
        assert len(slow_sampler.steps) < 12
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_slow_clients_are_cut_off(manifest_path):
    settings = make_settings(manifest_path, header_timeout_seconds=1.0, body_timeout_seconds=1.0)
    with live_server(create_app(settings, load_in_background=False), settings) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as trickle:  # headers never finished
            trickle.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\n")
            started = time.perf_counter()
            assert trickle.recv(1024) == b""  # closed by the server
            assert 0.8 < time.perf_counter() - started < 5
        with socket.create_connection((host, int(port)), timeout=10) as slow_body:
            slow_body.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"prompt\"")
            started = time.perf_counter()
            answer = b""
            while chunk := slow_body.recv(4096):  # until the server closes
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer
            assert 0.8 < time.perf_counter() - started < 5


def test_overload_gets_only_200_or_429_and_readiness_holds(manifest_path):
    settings = make_settings(manifest_path, image_queue_size=2, chat_queue_size=2, chat_max_batch=2)
    app = create_app(settings, load_in_background=False)
    requests = ([("/generate-image", {"model": "tiny-dit", "class_label": i % 10, "steps": 2, "seed": i})
                 for i in range(100)] +
                [("/chat", {"prompt": f"count to {i}", "max_tokens": 4}) for i in range(100)])

    async def storm() -> tuple[list[httpx.Response], list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=250)) as http:
            answers = asyncio.gather(*(http.post(path, json=body) for path, body in requests))
            ready = []
            for _ in range(5):
                await asyncio.sleep(0.1)
                ready.append((await http.get("/readyz")).status_code)
            return await answers, ready

    with live_server(app, settings) as url:
        answers, ready = asyncio.run(storm())
        after = httpx.post(f"{url}/chat", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert after.status_code == 200  # the same server serves on once the storm has passed
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 6 and statuses.count(429) >= 100  # queues of 2 in front of each engine
    for refused in (a for a in answers if a.status_code == 429):
        assert_error_shape(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
    assert ready == [200] * 5
