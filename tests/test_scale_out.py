"""Loopstack on Ray Serve, on one machine: a local Ray cluster with the front, 2 replicas of a tiny
image model and 1 chat replica (marked `ray`; one cluster for the module, about a minute)."""

from __future__ import annotations

import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

from server.distributed.app import build
from server.manifest import load_manifest, write_manifest
from tests.conftest import assert_error_shape, zoo_manifest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

IMAGE = "images-tiny-dit"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(zoo_dir, tmp_path_factory):
    """The base URL of the front; the zoo is a copy, so the reload test may change its manifest."""
    root = tmp_path_factory.mktemp("scale-out")
    shutil.copytree(zoo_dir / "artifacts", root / "artifacts")
    manifest = root / "weights_manifest.yaml"
    write_manifest(zoo_manifest(root), manifest)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="loopstack-tests")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"manifest": str(manifest), "artifact_root": str(root), "device": "cpu", "torch_threads": 1}
    serve.run(build({"settings": settings, "image_models": "tiny-dit", "chat": True,
                     "options": {IMAGE: {"num_replicas": 2}}}), name="loopstack", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the replicas did not load"
        time.sleep(0.5)
    try:
        yield url, manifest
    finally:
        serve.shutdown()
        ray.shutdown()


def image(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/generate-image", json={"model": "tiny-dit", "class_label": 3} | body, timeout=120)


def test_requests_spread_over_replicas_and_answer_as_one_server(cluster):
    url, _ = cluster
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda seed: image(url, seed=seed, steps=30), [7] * 24))
    assert all(a.status_code == 200 for a in answers)
    by_replica = {}
    for a in answers:
        by_replica.setdefault(a.headers["x-loopstack-replica"], a.json()["images"][0])
    assert len(by_replica) == 2, "Serve routes across both image replicas"
    # the same seeded request gives the same image on either replica: why the front may send it again
    assert len(set(by_replica.values())) == 1
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-lm", "messages": [{"role": "user", "content": "add 2 and 3"}], "max_tokens": 4, "seed": 1})
    assert chat.status_code == 200 and chat.json()["loopstack"]["trace"]["reason"]
    streamed = httpx.post(f"{url}/chat", timeout=120, json={
        "messages": [{"role": "user", "content": "add 2 and 3"}], "max_tokens": 4, "seed": 1, "stream": True})
    events = re.findall(r"^event: (\w+)", streamed.text, re.M)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "done" and set(events[:-1]) <= {"token"}, streamed.text
    assert_error_shape(image(url, steps=0), 422, "steps")
    assert_error_shape(image(url, model="no-such-model"), 404, "model")
    assert_error_shape(httpx.post(f"{url}/chat", content=b"{not json", timeout=30,
                                  headers={"content-type": "application/json"}), 422)
    assert_error_shape(httpx.post(f"{url}/chat", content=b'{"prompt": "hi"}', timeout=30), 415)  # no content type
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
    assert {"tiny-dit", "tiny-lm"} <= models and "tiny-pixart" not in models
    assert httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"].keys() >= {"/generate-image", "/chat"}


def scrape(address: str) -> str:
    return httpx.get(f"http://{address}/metrics", timeout=30).text


def images_made(text: str) -> float:
    return sum(float(v) for v in re.findall(r'^loopstack_images_total\{[^}]*\} (\S+)$', text, re.M))


def test_every_replica_publishes_its_metrics(cluster):
    url, _ = cluster
    targets = httpx.get(f"{url}/metrics/targets", timeout=60).json()
    by_deployment = {}
    for target in targets:
        by_deployment.setdefault(target["labels"]["deployment"], []).append(target)
    assert {k: len(v) for k, v in by_deployment.items()} == {"front": 1, IMAGE: 2, "chat": 1}
    before = {t["labels"]["replica"]: images_made(scrape(t["targets"][0])) for t in by_deployment[IMAGE]}
    with ThreadPoolExecutor(8) as pool:
        served = [a.headers["x-loopstack-replica"] for a in pool.map(lambda s: image(url, seed=s), range(16))]
    after = {t["labels"]["replica"]: images_made(scrape(t["targets"][0])) for t in by_deployment[IMAGE]}
    # each replica's own counter moved by exactly the images it answered
    assert {r: after[r] - before[r] for r in after} == {r: float(served.count(r)) for r in after}
    assert "loopstack_requests_total" in scrape(by_deployment["front"][0]["targets"][0])


def test_a_manifest_change_reaches_every_replica(cluster):
    url, manifest = cluster
    built = load_manifest(manifest)
    image_models = [m.model_copy(update={"default_steps": 6}) if m.name == "tiny-dit" else m for m in built.image]
    write_manifest(built.model_copy(update={"image": image_models}), manifest)
    deadline, updated = time.monotonic() + 60, set()
    while len(updated) < 2:  # each replica watches the manifest itself and answers with the new default
        assert time.monotonic() < deadline, f"only replicas {updated} reloaded"
        with ThreadPoolExecutor(8) as pool:
            for a in pool.map(lambda s: image(url, seed=s), range(8)):
                if a.json()["steps"] == 6:
                    updated.add(a.headers["x-loopstack-replica"])
        time.sleep(0.5)


def test_killed_replica_loses_no_seeded_request(cluster):
    url, _ = cluster
    targets = httpx.get(f"{url}/metrics/targets", timeout=60).json()
    retries_before = front_counter(targets, "loopstack_replica_retries_total")
    victim = None

    def send(i: int) -> httpx.Response:
        return image(url, steps=200, n=4, **({"seed": i} if i % 4 else {}))  # one in four unseeded

    with ThreadPoolExecutor(24) as pool:
        pending = [pool.submit(send, i) for i in range(24)]
        time.sleep(1.0)  # the batches are running on both replicas
        victim = next(t["labels"]["replica"] for t in targets if t["labels"]["deployment"] == IMAGE)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::loopstack#{IMAGE}#{victim}", namespace="serve"), no_restart=True)
        answers = [(i, p.result()) for i, p in enumerate(pending)]
    seeded = [a for i, a in answers if i % 4]
    unseeded = [a for i, a in answers if not i % 4]
    assert all(a.status_code == 200 for a in seeded), [a.text for a in seeded if a.status_code != 200]
    for a in unseeded:  # either answered, or told plainly that its replica stopped
        assert a.status_code == 200 or assert_error_shape(a, 503)["type"] == "replica_lost"
    print(f"unseeded: {sum(a.status_code == 200 for a in unseeded)} answered, "
          f"{sum(a.status_code == 503 for a in unseeded)} replica_lost")
    retried = front_counter(httpx.get(f"{url}/metrics/targets", timeout=60).json(),
                            "loopstack_replica_retries_total") - retries_before
    assert retried > 0, "some seeded requests were in flight on the killed replica"


def front_counter(targets: list, name: str) -> float:
    front = next(t for t in targets if t["labels"]["deployment"] == "front")
    return sum(float(v) for v in re.findall(rf'^{name}\{{[^}}]*\}} (\S+)$', scrape(front["targets"][0]), re.M))
