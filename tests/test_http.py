"""Health, model listing, OpenAPI, one error shape for every bad input, metrics, and the queue."""

from __future__ import annotations

import re
import threading
import time

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.imaging import batching as image_batching
from server.imaging import sampler as image_sampler
from tests.conftest import assert_error_shape, make_settings, per_job


def test_health_endpoints(client):
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["serving"] == ["tiny-dit", "tiny-dit-latent", "tiny-pixart", "tiny-lm"]
    assert body["loading"] == body["failed"] == body["placeholders"] == [] and body["generation"] >= 4
    assert "/" not in "".join(body["serving"] + body["failed"])  # entry names, never paths


def test_not_ready_until_models_load(tmp_path):
    missing = tmp_path / "weights_manifest.yaml"  # nothing built: the server reads the template
    with TestClient(create_app(make_settings(missing), load_in_background=False)) as c:
        assert c.get("/livez").status_code == 200
        error = c.get("/readyz")
        assert error.status_code == 503 and error.json()["error"]["type"] == "not_ready"
        assert "zoo/digits-dit" in error.json()["error"]["message"]  # the template's first entry, not built
        assert c.post("/chat", json={"prompt": "hi"}).status_code == 503
    settings = make_settings(missing, template=tmp_path / "no-template.yaml")
    with TestClient(create_app(settings, load_in_background=False)) as c:
        assert "no-template.yaml" in c.get("/readyz").json()["error"]["message"]


def test_models_are_listed(client):
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["tiny-dit"]["kind"] == "dit" and cards["tiny-dit"]["details"]["classes"][7] == "seven"
    assert cards["tiny-dit-latent"]["details"]["latent"] is True
    assert cards["tiny-pixart"]["details"]["native_size"] == 16
    lm = cards["tiny-lm"]["details"]
    assert (lm["quantization"], lm["domains"], lm["router"]) == ("nf4", ["chat", "math"], False)


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    assert {"/generate-image", "/chat", "/v1/models", "/readyz", "/livez", "/metrics"} <= set(spec["paths"])
    assert "ErrorBody" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


IMAGE = {"model": "tiny-dit", "class_label": 1}


@pytest.mark.parametrize(
    "body, status, param",
    [
        (IMAGE | {"steps": -1}, 422, "steps"),
        (IMAGE | {"steps": 0}, 422, "steps"),
        (IMAGE | {"steps": 100_000}, 422, "steps"),
        (IMAGE | {"steps": "ten"}, 422, "steps"),
        (IMAGE | {"steps": "10"}, 422, "steps"),
        (IMAGE | {"steps": 2.5}, 422, "steps"),
        (IMAGE | {"n": 0}, 422, "n"),
        (IMAGE | {"n": 1000}, 422, "n"),
        (IMAGE | {"guidance_scale": -1}, 422, "guidance_scale"),
        (IMAGE | {"guidance_scale": 1e9}, 422, "guidance_scale"),
        (IMAGE | {"seed": -3}, 422, "seed"),
        (IMAGE | {"seed": True}, 422, "seed"),
        (IMAGE | {"width": 17, "height": 17}, 422, "height"),
        (IMAGE | {"width": 16, "height": 32}, 422, "width"),
        (IMAGE | {"width": 100_000, "height": 100_000}, 422, "height"),
        (IMAGE | {"class_label": 10}, 422, "class_label"),
        (IMAGE | {"class_label": "eleven"}, 422, "class_label"),
        (IMAGE | {"prompt": "a seven"}, 422, "prompt"),
        (IMAGE | {"scheduler": "euler"}, 422, "scheduler"),
        (IMAGE | {"mode": "fast"}, 422, "mode"),
        (IMAGE | {"colour": "red"}, 422, "colour"),
        ({"class_label": 1}, 422, "model"),
        ({"model": "tiny-dit"}, 422, "class_label"),
        ({"model": "nope", "class_label": 1}, 404, "model"),
        ({"model": "tiny-pixart", "prompt": ""}, 422, "prompt"),
        ({"model": "tiny-pixart", "prompt": "   "}, 422, "prompt"),
        ({"model": "tiny-pixart", "prompt": "x" * 5000}, 422, "prompt"),
        ({"model": "tiny-pixart", "class_label": 2}, 422, "class_label"),
    ],
)
def test_bad_image_requests_get_a_4xx_in_the_error_shape(client, body, status, param):
    assert_error_shape(client.post("/generate-image", json=body), status, param)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({}, 422, None),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 422, None),
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
        ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100_000}, 422, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, 422, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, 422, "temperature"),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "model"),
        ({"prompt": "hi", "route": {"poetry": 1.0}}, 422, "route"),
        ({"prompt": "hi", "route": "sometimes"}, 422, "route"),
        ({"prompt": "x" * 5000}, 422, "prompt"),
    ],
)
def test_bad_chat_requests_get_a_4xx_in_the_error_shape(client, body, status, param):
    assert_error_shape(client.post("/chat", json=body), status, param)


def test_malformed_and_oversized_bodies(client):
    error = assert_error_shape(client.post("/generate-image", content=b"{not json",
                                           headers={"content-type": "application/json"}), 422)
    assert "JSON" in error["message"]
    assert_error_shape(client.post("/generate-image", json=["a", "list"]), 422)
    huge = {"model": "tiny-pixart", "prompt": "x" * 200_000}
    assert assert_error_shape(client.post("/generate-image", json=huge), 413)["type"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for _ in range(100):
            yield b"x" * 1024

    assert_error_shape(client.post("/chat", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert assert_error_shape(client.get("/nowhere"), 404)["type"] == "not_found"
    assert_error_shape(client.get("/generate-image"), 405)


def metric_value(client, name: str, **labels) -> float:
    text = client.get("/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def test_metrics_change_after_requests(client):
    before = {
        "ok": metric_value(client, "loopstack_requests_total", endpoint="/generate-image", status="200"),
        "bad": metric_value(client, "loopstack_requests_total", endpoint="/generate-image", status="422"),
        "steps": metric_value(client, "loopstack_image_denoise_steps_total", model="tiny-dit", mode="baseline"),
        "images": metric_value(client, "loopstack_image_seconds_count", model="tiny-dit", mode="baseline"),
        "gen": metric_value(client, "loopstack_chat_generation_tokens_total"),
        "ttft": metric_value(client, "loopstack_chat_time_to_first_token_seconds_count"),
    }
    client.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, "steps": 3, "n": 2})
    client.post("/generate-image", json={"model": "tiny-dit", "steps": -1})
    chat = client.post("/chat", json={"prompt": "hello", "max_tokens": 5}).json()

    assert metric_value(client, "loopstack_requests_total", endpoint="/generate-image", status="200") == before["ok"] + 1
    assert metric_value(client, "loopstack_requests_total", endpoint="/generate-image", status="422") == before["bad"] + 1
    assert metric_value(client, "loopstack_image_denoise_steps_total", model="tiny-dit", mode="baseline") == before["steps"] + 6
    assert metric_value(client, "loopstack_image_seconds_count", model="tiny-dit", mode="baseline") == before["images"] + 1
    assert metric_value(client, "loopstack_chat_generation_tokens_total") == before["gen"] + chat["usage"]["completion_tokens"]
    assert metric_value(client, "loopstack_chat_time_to_first_token_seconds_count") == before["ttft"] + 1
    text = client.get("/metrics").text
    for name in ("loopstack_engine_waiting", "loopstack_request_duration_seconds", "loopstack_chat_prompt_tokens_total",
                 "loopstack_chat_inter_token_latency_seconds", "loopstack_artifact_reloads_total"):
        assert name in text


def test_full_queue_answers_429_with_retry_after(manifest_path, monkeypatch):
    release = threading.Event()
    real_sample = image_sampler.sample

    def blocked_sample(backbone, job, **kwargs):
        release.wait(timeout=30)
        return real_sample(backbone, job)

    monkeypatch.setattr(image_batching, "sample_batch", per_job(blocked_sample))
    app = create_app(make_settings(manifest_path, image_queue_size=1, retry_after_seconds=7),
                     load_in_background=False)
    body = {"model": "tiny-dit", "class_label": 0, "steps": 1}
    with TestClient(app) as c:
        results = []
        workers = [threading.Thread(target=lambda: results.append(c.post("/generate-image", json=body)))
                   for _ in range(2)]
        for w in workers:
            w.start()
        engine = app.state.services.images.batcher.engine
        deadline = time.time() + 20
        while engine.waiting < 1 and time.time() < deadline:  # one running, one waiting
            time.sleep(0.01)
        assert engine.waiting == 1
        assert metric_value(c, "loopstack_engine_waiting", engine="image") == 1
        refused = c.post("/generate-image", json=body)
        assert_error_shape(refused, 429)
        assert refused.headers["retry-after"] == "7"
        assert c.post("/chat", json={"prompt": "hi", "max_tokens": 1}).status_code == 200  # other engine free
        release.set()
        for w in workers:
            w.join(timeout=30)
        assert [r.status_code for r in results] == [200, 200]


@pytest.mark.parametrize("path, body, param", [
    ("/generate-image", {"model": "tiny-pixart", "prompt": "a \ud800 cat"}, "prompt"),
    ("/chat", {"prompt": "hi \udfff"}, "prompt"),
    ("/chat", {"messages": [{"role": "user", "content": "\ud83d"}]}, "messages.0.content"),
    ("/chat", {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"model": "tiny-lm", "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
])
def test_a_lone_surrogate_in_text_is_refused_not_a_500(client, path, body, param):
    # sent as JSON's \\ud800 escape: valid JSON, not encodable text
    raw = json.dumps(body, ensure_ascii=True).encode()
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    error = assert_error_shape(response, 422)
    assert error["param"].startswith(param)  # pydantic refuses some while parsing JSON, our validator the rest
    # the same connection serves the next request
    assert client.post("/chat", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_retry_after_follows_the_measured_service_rate():
    import asyncio

    from server.engine import ServiceRate, WorkerEngine
    from server.metrics import Metrics

    rate = ServiceRate(fallback=7)
    assert rate.retry_after(3) == 7  # nothing timed yet: the operator's setting
    rate.record(2.0)
    assert rate.retry_after(3) == 6 and rate.retry_after(3, slots=8) == 1
    rate.record(12.0)  # a mean that moves a tenth of the way: 3 s
    assert rate.mean == pytest.approx(3.0) and rate.retry_after(2) == 6 and rate.retry_after(10_000) == 600
    engine = WorkerEngine("image", max_waiting=1, retry_after=7, metrics=Metrics())
    engine.start()
    asyncio.run(engine.submit(time.sleep, 0.3))
    assert engine.service.mean == pytest.approx(0.3, abs=0.1)  # the job's own time, as the engine ran it
