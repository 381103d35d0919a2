"""The metrics contract (docs/metrics.md): every response counted with its status, 5xx included;
error series present at 0 from the start; queue time and running/waiting per engine; chat time to
first token from the request's arrival; finish reasons; refused artifacts as a gauge that clears."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat import serving as chat_serving
from server.imaging import batching as image_batching
from server.imaging import sampler as image_sampler
from tests.conftest import live_server, make_settings, per_job

REPO = Path(__file__).resolve().parent.parent


def sample(client, name: str, **labels) -> float | None:
    """The value of one series on /metrics, or None when the series does not exist."""
    text = client.get("/metrics").text
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")) == labels:
            return float(match.group(2))
    return None


def documented_names() -> set[str]:
    table = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `((?:loopstack|process)_\w+)`", table, re.M))


def test_every_metric_is_documented_and_every_documented_metric_exists(manifest_path):
    app = create_app(make_settings(manifest_path), load_in_background=False)
    exported = {family.name for family in app.state.services.metrics.registry.collect()}
    # prometheus_client drops a counter's _total from the family name; the table gives the series name
    documented = {re.sub(r"_total$", "", name) for name in documented_names()}
    assert exported == documented


def test_error_series_exist_at_zero_before_the_first_error(manifest_path):
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as c:
        for endpoint in ("/chat", "/generate-image", "/v1/models", "unmatched"):
            for status in ("429", "500", "503"):
                assert sample(c, "loopstack_requests_total", endpoint=endpoint, status=status) == 0.0
        assert sample(c, "loopstack_chat_requests_finished_total", finish_reason="length") == 0.0
        assert sample(c, "loopstack_artifact_refused", model="manifest") == 0.0
        assert sample(c, "loopstack_engine_queue_limit", engine="chat") == 16


def test_an_unhandled_error_is_a_counted_500_in_the_one_error_shape(manifest_path, monkeypatch):
    def broken(backbone, job, **kwargs):
        raise RuntimeError("a bug in the sampler")

    monkeypatch.setattr(image_batching, "sample_batch", per_job(broken))
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False),
                    raise_server_exceptions=False) as c:
        response = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "steps": 2})
        assert response.status_code == 500
        assert response.json() == {"error": {"type": "internal", "param": None,
                                             "message": "internal server error; the server log has details"}}
        assert sample(c, "loopstack_requests_total", endpoint="/generate-image", status="500") == 1.0
        assert sample(c, "loopstack_request_duration_seconds_count", endpoint="/generate-image", status="500") == 1.0
        assert sample(c, "loopstack_queue_seconds_count", engine="image", status="500") == 1.0


def test_latency_and_queue_time_carry_the_status(client):
    before = sample(client, "loopstack_queue_seconds_count", engine="chat", status="200") or 0.0
    ok = sample(client, "loopstack_request_duration_seconds_count", endpoint="/chat", status="200") or 0.0
    bad = sample(client, "loopstack_request_duration_seconds_count", endpoint="/chat", status="422") or 0.0
    assert client.post("/chat", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert client.post("/chat", json={"prompt": " "}).status_code == 422  # refused before any queue
    assert sample(client, "loopstack_queue_seconds_count", engine="chat", status="200") == before + 1
    assert sample(client, "loopstack_request_duration_seconds_count", endpoint="/chat", status="200") == ok + 1
    assert sample(client, "loopstack_request_duration_seconds_count", endpoint="/chat", status="422") == bad + 1
    assert sample(client, "loopstack_queue_seconds_count", engine="chat", status="422") is None


def test_time_to_first_token_counts_from_arrival(manifest_path, monkeypatch):
    """Time before the worker starts (here a slow request plan) is in the metric, not in the trace's
    job-side time to first token."""
    real_plan = chat_serving.plan_job

    def slow_plan(*args):
        time.sleep(0.4)
        return real_plan(*args)

    monkeypatch.setattr(chat_serving, "plan_job", slow_plan)
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as c:
        body = c.post("/chat", json={"prompt": "hello", "max_tokens": 3}).json()
        assert sample(c, "loopstack_chat_time_to_first_token_seconds_count") == 1.0
        # the plan ran before the job started: from arrival is the job's own time to first token and more
        assert (sample(c, "loopstack_chat_time_to_first_token_seconds_sum")
                >= body["trace"]["time_to_first_token_seconds"] + 0.4)
        assert sample(c, "loopstack_chat_requests_finished_total", finish_reason=body["finish_reason"]) == 1.0


def test_tokens_and_prefill_and_decode_seconds_per_request(manifest_path):
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as c:
        bodies = [c.post("/chat", json={"prompt": prompt, "max_tokens": n}).json()
                  for prompt, n in (("hello", 3), ("Tell me about the sea and the sky, please", 7))]
        usage = [body["usage"] for body in bodies]
        assert sample(c, "loopstack_chat_request_prompt_tokens_count") == 2.0
        assert sample(c, "loopstack_chat_request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usage)
        assert sample(c, "loopstack_chat_request_generation_tokens_sum") == sum(u["completion_tokens"] for u in usage)
        assert sample(c, "loopstack_chat_request_generation_tokens_bucket", le="8.0") == 2.0
        assert sample(c, "loopstack_chat_request_generation_tokens_bucket", le="1.0") == sum(
            u["completion_tokens"] <= 1 for u in usage)
        # prefill ends at the first token, decode runs from it to the last: together the answers' own time
        prefill = sample(c, "loopstack_chat_request_prefill_seconds_sum")
        decode = sample(c, "loopstack_chat_request_decode_seconds_sum")
        ttft = sum(body["trace"]["time_to_first_token_seconds"] for body in bodies)
        assert prefill == pytest.approx(ttft, abs=1e-6) and decode > 0
        assert prefill + decode == pytest.approx(sum(b["trace"]["generation_seconds"] for b in bodies), abs=1e-6)
        assert sample(c, "loopstack_chat_kv_cache_budget_tokens") == 34816.0
        assert sample(c, "loopstack_chat_kv_cache_tokens") == 0.0  # both answers left: nothing held


def test_running_and_waiting_per_engine(manifest_path, monkeypatch):
    release = threading.Event()
    real_sample = image_sampler.sample

    def blocked_sample(backbone, job, **kwargs):
        release.wait(timeout=30)
        return real_sample(backbone, job)

    monkeypatch.setattr(image_batching, "sample_batch", per_job(blocked_sample))
    app = create_app(make_settings(manifest_path), load_in_background=False)
    body = {"model": "tiny-dit", "class_label": 0, "steps": 1}
    with TestClient(app) as c:
        workers = [threading.Thread(target=c.post, args=("/generate-image",), kwargs={"json": body}) for _ in range(3)]
        for w in workers:
            w.start()
        deadline = time.time() + 20
        while app.state.services.images.batcher.engine.waiting < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert sample(c, "loopstack_engine_running", engine="image") == 1.0
        assert sample(c, "loopstack_engine_waiting", engine="image") == 2.0
        assert sample(c, "loopstack_engine_running", engine="chat") == 0.0
        release.set()
        for w in workers:
            w.join(timeout=30)
        assert sample(c, "loopstack_engine_running", engine="image") == 0.0
        assert sample(c, "loopstack_engine_waiting", engine="image") == 0.0
        # the two that waited waited for the first: the histogram saw queue time
        assert sample(c, "loopstack_queue_seconds_count", engine="image", status="200") == 3.0
        assert sample(c, "loopstack_queue_seconds_sum", engine="image", status="200") > 0.0


def test_the_keep_alive_connection_survives_a_500(manifest_path, monkeypatch):
    import http.client

    def broken(backbone, job, **kwargs):
        raise RuntimeError("a bug in the sampler")

    monkeypatch.setattr(image_batching, "sample_batch", per_job(broken))
    settings = make_settings(manifest_path)
    with live_server(create_app(settings, load_in_background=False), settings) as url:
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        headers = {"content-type": "application/json"}
        connection.request("POST", "/generate-image", json.dumps({"model": "tiny-dit", "class_label": 1}), headers)
        first = connection.getresponse()
        assert first.status == 500 and json.loads(first.read())["error"]["type"] == "internal"
        connection.request("GET", "/livez")  # the same connection, not a new one
        second = connection.getresponse()
        assert second.status == 200
        second.read()
        connection.close()
