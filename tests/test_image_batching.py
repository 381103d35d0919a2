"""Concurrent image requests sampled as one batch (server/imaging/batching.py): each answer is the
image its request gets alone, to 1/255 per pixel."""

from __future__ import annotations

import threading
import time

import numpy as np
from fastapi.testclient import TestClient

from server.app import create_app
from server.imaging import batching as image_batching
from tests.conftest import make_settings
from tests.test_images import decode


def pixels(body: dict) -> list[np.ndarray]:
    return [np.asarray(decode(b), dtype=np.int16) for b in body["images"]]


def test_requests_waiting_together_are_sampled_in_one_batch_each_as_alone(manifest_path, monkeypatch):
    real, batches, started, release = image_batching.sample_batch, [], threading.Event(), threading.Event()

    def held_first(backbone, jobs, progress=None, *args, **kwargs):
        if not batches:  # the first batch holds the worker until the others are listed behind it
            started.set()
            release.wait(timeout=30)
        batches.append(sum(len(job.seeds) for job in jobs))
        return real(backbone, jobs, progress, *args, **kwargs)

    monkeypatch.setattr(image_batching, "sample_batch", held_first)
    app = create_app(make_settings(manifest_path, image_batch_window_ms=0), load_in_background=False)
    first = {"model": "tiny-dit", "class_label": 0, "seed": 1}
    # their own seeds, classes, image counts and guidance (unguided among guided), one compatible set
    bodies = [{"model": "tiny-dit", "class_label": 1, "seed": 5, "guidance_scale": 1.0},
              {"model": "tiny-dit", "class_label": 2, "seed": 6, "n": 2, "guidance_scale": 3.0},
              {"model": "tiny-dit", "class_label": 3, "seed": 7, "guidance_scale": 5.0},
              {"model": "tiny-dit", "class_label": 4, "seed": 8}]
    with TestClient(app) as client:
        answers: dict[int, dict] = {}

        def send(i, body):
            answers[i] = client.post("/generate-image", json=body).json()

        threads = [threading.Thread(target=send, args=(-1, first))]
        threads[0].start()
        assert started.wait(timeout=30)  # the first request is on the worker, held
        threads += [threading.Thread(target=send, args=(i, body)) for i, body in enumerate(bodies)]
        for thread in threads[1:]:
            thread.start()
        deadline = time.time() + 30
        while app.state.services.images.batcher.engine.waiting < len(bodies) and time.time() < deadline:
            time.sleep(0.01)
        release.set()
        for thread in threads:
            thread.join(timeout=60)
        alone = [client.post("/generate-image", json=body).json() for body in bodies]
        metrics = client.get("/metrics").text

    assert batches[:2] == [1, 5]  # the held request alone, then the four others (five images) together
    for together, by_itself in zip((answers[i] for i in range(len(bodies))), alone):
        assert together["seeds"] == by_itself["seeds"]
        for a, b in zip(pixels(together), pixels(by_itself)):
            assert np.abs(a - b).max() <= 1  # 1/255: CPU matmuls are not batch-invariant bit for bit
    assert np.abs(pixels(answers[1])[0] - pixels(answers[1])[1]).max() > 10  # its two images differ
    # batches: the held one, the four together, then the four alone; images: 1 + 5 + 5
    assert "loopstack_image_batch_images_count 6.0" in metrics and "loopstack_image_batch_images_sum 11.0" in metrics


def test_the_images_bench_measures_both_servings_and_checks_the_targets(manifest_path):
    from bench import images as bench

    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as client:
        batcher, body = client.app.state.services.images.batcher, {"model": "tiny-dit", "class_label": 1}
        sequential, batched = bench.alternate(bench.one_request(client, batcher, 1, body),
                                              bench.one_request(client, batcher, 16, body), 3)
        rows = [{"mode": "baseline", "clients": 1, "serving": serving} | bench.pooled([{"wall_s": sum(run), "latencies": run}])
                for serving, run in (("sequential", sequential), ("batched", batched))]
        rows[1]["paired"] = bench.paired_ratio(sequential, batched)
        for serving, batch in (("sequential", 1), ("batched", 16)):
            batcher.max_images = batch
            runs = [bench.closed_loop(client, body, 4, 1) for _ in range(2)]
            rows.append({"mode": "baseline", "clients": 4, "serving": serving} | bench.pooled(runs))
    assert [r["requests"] for r in rows] == [3, 3, 8, 8] and all(r["images_per_s"] > 0 for r in rows)
    table = bench.report(rows, 4)
    assert "within 5%: per pair" in table and "img/s >= 3x" in table and "p95 <=" in table


def test_ab_latency_alternates_the_servers_and_brackets_the_per_pair_ratio():
    from bench.ab_latency import alternate, paired_ratio

    calls = []
    a, b = alternate(lambda i: calls.append(("a", i)), lambda i: calls.append(("b", i)), 3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)] and len(a) == len(b) == 3
    base = [1.0, 1.2, 0.8, 1.5, 0.9, 1.1, 1.3, 0.7]  # drifting speed, B always 10% slower than A at the time
    slower = paired_ratio(base, [1.1 * x for x in base])
    assert abs(slower["median_ratio"] - 1.1) < 1e-9 and abs(slower["ci95"][0] - 1.1) < 1e-9
    noisy = paired_ratio(base, [x * (1 + 0.05 * (-1) ** i) for i, x in enumerate(base)])
    assert noisy["ci95"][0] < 1 < noisy["ci95"][1]


def test_a_lone_request_never_waits_for_a_batch_and_concurrent_traffic_does(manifest_path):
    """The collection window applies only to requests that came while the worker was busy."""
    from server.imaging.batching import ImageBatcher
    from server.metrics import Metrics
    from tests.test_ilf import backbone_named
    from server.imaging.sampler import SampleJob
    from dataclasses import replace

    backbone = backbone_named(manifest_path, "tiny-dit")
    batcher = ImageBatcher(engine=None, max_images=16, window=0.2, metrics=Metrics())
    job = SampleJob([1], [3], 2, 1.0, backbone.native_size, backbone.native_size)
    started = time.perf_counter()
    batcher.run(batcher.list(backbone, job))
    assert time.perf_counter() - started < 0.2  # alone, with the worker idle: no wait
    first, second = batcher.list(backbone, job), batcher.list(backbone, replace(job, seeds=[4]))  # concurrent
    started = time.perf_counter()
    batcher.run(first)
    assert time.perf_counter() - started >= 0.2  # it waited for others to join, and took the second along
    assert second.outcome is not None and second.outcome.images.shape[0] == 1


def test_a_streamed_request_joins_a_batch_and_still_reports_each_step(manifest_path, monkeypatch):
    from tests.test_streaming import sse_events

    real, batches, started, release = image_batching.sample_batch, [], threading.Event(), threading.Event()

    def held_first(backbone, jobs, progress=None, *args, **kwargs):
        if not batches:
            started.set()
            release.wait(timeout=30)
        batches.append(len(jobs))
        return real(backbone, jobs, progress, *args, **kwargs)

    monkeypatch.setattr(image_batching, "sample_batch", held_first)
    app = create_app(make_settings(manifest_path, image_batch_window_ms=0), load_in_background=False)
    common = {"model": "tiny-dit", "steps": 4, "mode": "baseline"}
    streamed, plain = common | {"class_label": 2, "seed": 11}, common | {"class_label": 3, "seed": 12}
    with TestClient(app) as client:
        answers: dict[str, object] = {}
        threads = [threading.Thread(target=lambda: client.post("/generate-image", json=common | {"class_label": 0}))]
        threads[0].start()
        assert started.wait(timeout=30)
        threads += [threading.Thread(target=lambda: answers.update(stream=client.post(
                        "/generate-image", json=streamed | {"stream": True}))),
                    threading.Thread(target=lambda: answers.update(plain=client.post("/generate-image", json=plain)))]
        for thread in threads[1:]:
            thread.start()
        deadline = time.time() + 30
        while app.state.services.images.batcher.engine.waiting < 2 and time.time() < deadline:
            time.sleep(0.01)
        release.set()
        for thread in threads:
            thread.join(timeout=60)
        streamed_alone = client.post("/generate-image", json=streamed).json()

    assert batches[:2] == [1, 2]  # the held request, then the stream and the plain request together
    events = sse_events(answers["stream"])
    assert [(name, data["step"]) for name, data in events[:-1]] == [("progress", i) for i in range(1, 5)]
    assert events[-1][0] == "done" and answers["plain"].status_code == 200
    for a, b in zip(pixels(events[-1][1]), pixels(streamed_alone)):
        assert np.abs(a - b).max() <= 1
