"""The chat engine's KV-cache budget and the gauges a gateway reads: rows wait for KV-cache tokens
instead of outgrowing the budget, one that could never fit is a 422, and the held and reserved
tokens and the running rows' domains follow the batch step by step."""

from __future__ import annotations

import asyncio

import pytest

from server.chat.decoding import generate
from server.chat.engine_gauges import reservation
from server.errors import ApiError
from server.metrics import Metrics
from tests.test_batching import answered_together, chat_with_stacks, job, started_engine

ROUTED = (({"math": 1.0}, "What is 3 + 4?"), ({"chat": 0.7, "math": 0.4}, "Name a colour"),
          ({"chat": 1.0}, "Tell me something about the sea"), ({}, "hi"))


def recorded(engine, metrics: Metrics) -> list[dict]:
    """After every engine step: the gauges as Prometheus would read them."""
    seen, publish = [], engine.gauges.publish

    def publish_and_read(prefilling, batches) -> None:
        publish(prefilling, batches)
        value = metrics.registry.get_sample_value
        seen.append({"held": value("loopstack_chat_kv_cache_tokens"),
                     "reserved": value("loopstack_chat_kv_cache_reserved_tokens"),
                     "rows": len(prefilling) + sum(len(b.rows) for b in batches),
                     **{d: value("loopstack_chat_running_rows", {"domain": d}) for d in ("chat", "math")}})

    engine.gauges.publish = publish_and_read
    return seen


def test_rows_wait_for_kv_cache_tokens_and_answer_as_each_alone(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    jobs = [job(prompt, route, max_new_tokens=8) for route, prompt in ROUTED]
    needs = [reservation(chat, j) for j in jobs]
    budget = sorted(needs)[-1] + sorted(needs)[-2]  # any two fit together, no three
    metrics = Metrics()
    engine = started_engine(metrics=metrics, kv_cache_tokens=budget)
    seen = recorded(engine, metrics)
    results = answered_together(engine, chat, jobs)
    assert metrics.registry.get_sample_value("loopstack_chat_kv_cache_budget_tokens") == budget
    assert max(step["reserved"] for step in seen) <= budget  # never more than the budget admitted
    assert max(step["rows"] for step in seen) == 2  # rows waited in the queue for tokens to free
    for j, result in zip(jobs, results):
        alone = generate(chat, j, j.route)
        assert (result.text, result.completion_tokens) == (alone.text, alone.completion_tokens), j
    assert seen[-1]["held"] == seen[-1]["reserved"] == 0 and seen[-1]["chat"] == seen[-1]["math"] == 0


def test_held_tokens_and_running_domains_follow_the_batch(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    jobs = [job(prompt, route, max_new_tokens=6, min_tokens=6) for route, prompt in ROUTED]
    metrics = Metrics()
    engine = started_engine(metrics=metrics)
    seen = recorded(engine, metrics)
    answered_together(engine, chat, jobs)
    full = [step for step in seen if step["rows"] == len(jobs)]
    assert full and all(step["math"] == 2 and step["chat"] == 2 for step in full)  # rows applying each domain
    reserved = sum(reservation(chat, j) for j in jobs)
    assert all(step["reserved"] == reserved for step in full)
    held = [step["held"] for step in full]
    assert len(held) >= 3 and held[0] > 0
    assert {b - a for a, b in zip(held, held[1:])} == {len(jobs)}  # each step's token, one a row, is held
    longest = max(reservation(chat, j) for j in jobs)
    assert held[-1] <= len(jobs) * longest  # the rows share the longest's width (left padding is memory)


def test_a_request_that_could_never_fit_is_a_422_before_it_queues(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    messages = [{"role": "user", "content": "Tell me something about the sea"}]
    big = job(messages[0]["content"], {}, max_new_tokens=64, input_ids=chat.encode(messages))  # as the server plans it
    engine = started_engine(kv_cache_tokens=reservation(chat, big) - 1)
    try:
        with pytest.raises(ApiError) as refused:
            engine.enqueue(chat, big)
        assert refused.value.status == 422 and "KV-cache tokens" in str(refused.value)
        assert engine.waiting == 0
        with pytest.raises(ApiError):  # a job without its rendered prompt is counted, and refused, at the head
            asyncio.run(engine.submit(chat, job(messages[0]["content"], {}, max_new_tokens=64)))
        small = job("hi", {}, max_new_tokens=4)
        assert asyncio.run(engine.submit(chat, small)).completion_tokens >= 1
    finally:
        engine.shutdown()


def test_over_http_it_is_the_one_error_shape_and_the_server_goes_on(manifest_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.manifest import load_manifest
    from tests.conftest import assert_error_shape, make_settings

    settings = make_settings(manifest_path, chat_kv_cache_tokens=40)
    with TestClient(create_app(settings, load_in_background=False)) as client:
        refused = client.post("/chat", json={"prompt": "Tell me something about the sea and the sky", "max_tokens": 32})
        assert "KV-cache tokens" in assert_error_shape(refused, 422)["message"]
        model = load_manifest(manifest_path).chat.base.name
        openai = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 32,
                                                           "messages": [{"role": "user", "content": "Tell me a story"}]})
        assert "KV-cache tokens" in assert_error_shape(openai, 422)["message"]
        assert client.post("/chat", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
