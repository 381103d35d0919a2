"""Streaming: POST /chat with "stream": true as server-sent events, parsed as a client would."""

from __future__ import annotations

import json

from tests.conftest import assert_error_shape


def sse_events(response) -> list[tuple[str, dict | str]]:
    """(event, data) pairs of an event stream: blank-line separated blocks of `field: value` lines."""
    events = []
    for block in response.text.replace("\r\n", "\n").split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "data" in fields:
            data = "\n".join(fields["data"])
            events.append((fields.get("event", ["message"])[0], data if data == "[DONE]" else json.loads(data)))
    return events


def test_streamed_chat_sends_tokens_that_add_up_to_the_answer_then_the_whole_response(client):
    request = {"prompt": "Tell me about the sea", "max_tokens": 12, "route": {"math": 1.0}}
    plain = client.post("/chat", json=request).json()
    response = client.post("/chat", json={**request, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["X-Loopstack-Generation"]
    events = sse_events(response)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"} and len(names) >= 4  # pieces, not one block
    done = events[-1][1]
    assert "".join(data["text"] for name, data in events if name == "token") == done["text"] == plain["text"]
    assert done["usage"] == plain["usage"] and done["finish_reason"] == plain["finish_reason"]
    assert done["trace"]["domains_applied"] == plain["trace"]["domains_applied"]


def test_a_streamed_answer_stops_before_its_stop_sequence_and_never_sends_it(client):
    free = client.post("/chat", json={"prompt": "Count: one two", "max_tokens": 16, "route": "none"}).json()["text"]
    assert len(free) > 8
    stop = free[4:7]
    response = client.post("/chat", json={"prompt": "Count: one two", "max_tokens": 16, "route": "none",
                                          "stop": [stop], "stream": True})
    events = sse_events(response)
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed == events[-1][1]["text"] == free[:free.find(stop)].strip() and stop not in streamed


def test_a_refused_streaming_request_is_a_plain_error_before_any_event(client):
    response = client.post("/chat", json={"prompt": "hi", "stream": True, "route": {"astrology": 1.0}})
    assert_error_shape(response, 422, "route")
    assert not response.headers["content-type"].startswith("text/event-stream")


def test_a_streamed_image_reports_each_step_then_the_same_images_as_a_plain_request(client):
    request = {"model": "tiny-dit", "class_label": 0, "seed": 5, "steps": 4, "n": 2, "mode": "baseline"}
    plain = client.post("/generate-image", json=request).json()
    response = client.post("/generate-image", json={**request, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [name for name, _ in events] == ["progress"] * 4 + ["done"]
    assert [(d["step"], d["steps"], d["mode"]) for _, d in events[:4]] == [(i, 4, "baseline") for i in range(1, 5)]
    done = events[-1][1]
    assert done["images"] == plain["images"] and done["seeds"] == plain["seeds"] == [5, 6]


def test_a_refused_image_stream_is_a_plain_error(client):
    response = client.post("/generate-image", json={"model": "tiny-dit", "class_label": 99, "stream": True})
    assert_error_shape(response, 422, "class_label")


def test_a_closed_image_stream_stops_the_sampling_at_its_next_step(manifest_path, monkeypatch):
    import asyncio

    from server.engine import WorkerEngine
    from server.imaging import batching, sampler, serving
    from server.imaging.batching import ImageBatcher
    from server.imaging.backbones import load_image_backbone
    from server.manifest import ArtifactResolver, load_manifest
    from server.metrics import Metrics
    from server.schemas.images import ImageRequest
    from tests.conftest import make_settings, per_job

    spec = next(m for m in load_manifest(manifest_path).image if m.name == "tiny-dit")
    backbone = load_image_backbone(spec, ArtifactResolver(manifest_path.parent), "cpu")
    engine = WorkerEngine("image", max_waiting=2, retry_after=1, metrics=Metrics())
    engine.start()
    batcher = ImageBatcher(engine, max_images=16, window=0.005, metrics=Metrics())
    sampled, real = [], sampler.sample

    def counting(backbone, job, progress):
        def counted(done, total):
            sampled.append(done)
            progress(done, total)
        return real(backbone, job, progress=counted)

    monkeypatch.setattr(batching, "sample_batch", per_job(counting))

    async def read_two_steps_then_close():
        service = serving.ImageService(make_settings(manifest_path), batcher, Metrics())
        events = await serving.start_stream(ImageRequest(model="tiny-dit", class_label=0, steps=50, mode="baseline"),
                                            backbone, 1, service)
        seen = [await anext(events), await anext(events)]
        await events.aclose()
        await engine.submit(lambda: None)  # runs once the worker has left the stopped job
        return seen

    seen = asyncio.run(read_two_steps_then_close())
    assert [(p.step, p.steps) for p in seen] == [(1, 50), (2, 50)]
    assert 2 <= max(sampled) <= 5  # stopped a step or so after the close, not after 50


def test_a_drain_ends_every_stream_with_its_final_or_its_error_event(manifest_path, monkeypatch, caplog):
    """SIGTERM with an OpenAI stream, an image stream and two /chat streams in flight: within the
    drain window the short one finishes (`done`), the long ones end with an `error` event
    (`shutting_down`; OpenAI's then `[DONE]`), none is cut without a word, and the access log says
    how each ended."""
    import logging
    import threading
    import time

    import httpx
    from sse_starlette.sse import AppStatus

    from server.app import create_app
    from server.chat.decoding import DecodeBatch
    from server.imaging import batching, sampler
    from tests.conftest import make_settings, per_job, running_server

    def slow_sample(backbone, job, progress=None):
        def slow(done, total):
            time.sleep(0.3)
            progress(done, total)
        return sampler.sample(backbone, job, progress=slow)

    real_step = DecodeBatch.step

    def slow_step(self):
        time.sleep(0.1)
        return real_step(self)

    monkeypatch.setattr(batching, "sample_batch", per_job(slow_sample))
    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    settings = make_settings(manifest_path, shutdown_drain_seconds=3, watch=False)
    app = create_app(settings, load_in_background=False)
    long_chat = {"prompt": "Tell me a story", "max_tokens": 200, "stream": True}
    streams = {
        "openai": ("/v1/chat/completions", {"model": "tiny-lm", "max_tokens": 200, "stream": True,
                                            "messages": [{"role": "user", "content": "Tell me a story"}]}),
        "image": ("/generate-image", {"model": "tiny-dit", "class_label": 1, "steps": 50, "mode": "baseline",
                                      "stream": True}),
        "chat": ("/chat", long_chat),
        "short": ("/chat", {**long_chat, "max_tokens": 2}),
    }
    events, started = {}, {name: threading.Event() for name in streams}

    def read(name, url):
        path, body = streams[name]
        with httpx.stream("POST", url + path, json=body, timeout=60) as response:
            text = ""
            for chunk in response.iter_text():
                text += chunk
                started[name].set()
        events[name] = sse_events(type("Body", (), {"text": text})())

    caplog.set_level(logging.INFO, logger="server.access")
    try:
        with running_server(app, settings) as (url, server):
            chat = app.state.services.registry.current.chat
            chat.model.generation_config.eos_token_id = None  # long answers: no end of turn comes early
            chat.tokenizer.eos_token_id = None
            readers = [threading.Thread(target=read, args=(name, url)) for name in streams]
            for reader in readers:
                reader.start()
            assert all(started[name].wait(30) for name in streams)
            AppStatus.should_exit = True  # what uvicorn's SIGTERM handler sets (sse-starlette watches it)
            server.should_exit = True
            for reader in readers:
                reader.join(timeout=30)
    finally:
        AppStatus.should_exit = False
    assert events["short"][-1][0] == "done"
    for name in ("chat", "image"):
        assert events[name][-1][0] == "error" and events[name][-1][1]["error"]["type"] == "shutting_down", name
    assert events["openai"][-1] == ("message", "[DONE]")
    assert events["openai"][-2][1]["error"]["type"] == "shutting_down"
    endings = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert sum("stream with an error event (shutting_down)" in line for line in endings) == 3
    assert sum("stream complete" in line for line in endings) == 1
