"""bench/load.py on the tiny zoo: a short ramp and hold against a live server, the verdicts it
draws, and its refusal to load anything but this machine."""

from __future__ import annotations

import asyncio

import pytest

from bench import load
from server.app import create_app
from server.imaging import batching as image_batching
from server.imaging import sampler as image_sampler
from tests.conftest import live_server, make_settings, per_job


def test_a_short_run_finds_a_capacity_holds_it_and_reads_the_servers_memory(manifest_path):
    settings = make_settings(manifest_path)
    with live_server(create_app(settings, load_in_background=False), settings) as url:
        result = asyncio.run(load.run(url, hold_seconds=3, step_seconds=2, max_steps=2, chat_tokens=2,
                                      unloaded_per_endpoint=3))
    labels = set(result["unloaded"])
    assert {"/generate-image tiny-dit", "/generate-image tiny-pixart"} <= labels
    assert any(label.startswith("/chat ") for label in labels)
    assert result["capacity_rps"] > 0 and 1 <= len(result["ramp"]) <= 2
    hold = result["hold"]
    assert hold["sent"] > 0 and hold["failures"] == 0
    assert sum(e["requests"] for e in hold["endpoints"].values()) == hold["sent"]
    assert set(hold["statuses"]) <= {"200", "429"}
    assert result["memory"]["warm_bytes"] > 50 * 2**20 and result["memory"]["samples"]  # a real process's RSS
    assert "capacity" in load.report(result)


def test_a_5xx_fails_the_run(manifest_path, monkeypatch):
    real, calls = image_sampler.sample, []

    def breaks_after_warm_up(backbone, job, progress=None):  # the unloaded requests succeed, later ones fail
        calls.append(1)
        if len(calls) > 6:
            raise RuntimeError("sampler failure")
        return real(backbone, job, progress=progress)

    monkeypatch.setattr(image_batching, "sample_batch", per_job(breaks_after_warm_up))
    settings = make_settings(manifest_path)
    with live_server(create_app(settings, load_in_background=False), settings) as url:
        result = asyncio.run(load.run(url, hold_seconds=2, rate=5, chat_tokens=2, unloaded_per_endpoint=2))
    assert result["hold"]["failures"] > 0 and not result["passed"]


def test_a_rate_holds_only_under_the_latency_bound_with_few_refusals():
    baseline = {"a": {"p95_s": 1.0}, "b": {"p95_s": 0.1}}

    def step(p95_a, p95_b, refused=0):
        return {"a": {"requests": 100, "statuses": {"200": 100 - refused, "429": refused}, "p95_s": p95_a},
                "b": {"requests": 100, "statuses": {"200": 100}, "p95_s": p95_b}}

    assert load.holds(step(1.9, 0.19), baseline, 2.0)
    assert not load.holds(step(1.9, 0.21), baseline, 2.0)  # one endpoint over its own bound is enough
    assert not load.holds(step(1.0, 0.1, refused=3), baseline, 2.0)  # 3 of 200 refused: over 1%
    assert load.failures([load.Shot("a", 0, 503, 0.1), load.Shot("a", 0, "error", 0.1),
                          load.Shot("a", 0, 429, 0.1)]) == 2


def test_only_loopback_servers_are_loaded():
    load.refuse_remote("http://127.0.0.1:8000")
    load.refuse_remote("http://localhost:8000")
    with pytest.raises(SystemExit, match="loopback"):
        load.refuse_remote("http://192.0.2.1:8000")
