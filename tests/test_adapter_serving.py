"""PEFT adapters as the server serves them: from the manifest (by name, alias, in the model list,
refused with the reason and the rest served), loaded and unloaded at run time through vLLM's routes
(recorded in the built manifest, under concurrent requests, a running answer finishing), and the
residency that keeps at most LOOPSTACK_MAX_LOADED_ADAPTERS in memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat.adapters import load_adapter
from server.manifest import Adapter, load_manifest, write_manifest
from tests.conftest import make_settings, recorded_source
from tests.test_adapters import ADAPTERS, peft_adapter, served_base, tiny  # noqa: F401 (tiny: a fixture)


@pytest.fixture(scope="module")
def adapter_manifest(zoo_dir, manifest_path, tmp_path_factory) -> Path:
    """The tiny zoo plus two PEFT adapters made on its chat base: one served, one that is refused (DoRA)."""
    root = tmp_path_factory.mktemp("served-adapters")
    shutil.copytree(zoo_dir / "artifacts", root / "artifacts")
    for name, config in {"shouty": ADAPTERS["r16-all"], "dora": dict(r=4, target_modules=["q_proj"], use_dora=True)}.items():
        peft_adapter(root / "artifacts", name, **config, base="lm")  # into artifacts/adapters/<name>
    manifest = load_manifest(manifest_path)
    adapters = [Adapter(name=n, source=recorded_source(root, f"artifacts/adapters/{n}")) for n in ("shouty", "dora")]
    chat = manifest.chat.model_copy(update={"adapters": adapters})
    write_manifest(manifest.model_copy(update={"chat": chat}), root / "weights_manifest.yaml")
    return root / "weights_manifest.yaml"


def test_an_adapter_in_the_manifest_serves_by_name_by_alias_and_in_the_model_list(adapter_manifest):
    with TestClient(create_app(make_settings(adapter_manifest), load_in_background=False)) as c:
        request = {"prompt": "Hello there", "max_tokens": 6}
        routed = c.post("/chat", json=request | {"route": {"shouty": 1.0}}).json()
        base = c.post("/chat", json=request | {"route": "none"}).json()
        auto = c.post("/chat", json=request).json()
        alias = c.post("/v1/chat/completions", json={"model": "tiny-lm+shouty", "max_tokens": 6, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Hello there"}]})
        unknown = c.post("/chat", json=request | {"route": {"whisper": 1.0}})
        models = c.get("/v1/models").json()["data"]
    assert routed["trace"]["domains_applied"] == {"shouty": 1.0} and routed["text"] != base["text"]
    assert auto["trace"]["domains_applied"] == {} and auto["text"] == base["text"]
    assert alias.status_code == 200 and alias.json()["choices"][0]["message"]["content"] == routed["text"]
    assert unknown.status_code == 422 and "whisper" in unknown.json()["error"]["message"]
    card = next(m for m in models if m["id"] == "tiny-lm")
    assert card["adapters"] == ["shouty"] and "tiny-lm+shouty" in {m["id"] for m in models}
    described = card["details"]["adapters"]["shouty"]
    assert described["rank"] == 16 and len(described["targets"]) == 7 and described["source"] == "artifacts/adapters/shouty"
    refused = [e for e in card["errors"] if e["entry"] == "tiny-lm/adapters/dora"]
    assert refused and "DoRA" in refused[0]["reason"]


def test_auto_leaves_off_an_adapter_the_router_was_not_trained_on_and_says_so():
    from server.chat.router import plan_route

    class Router:  # the meta-router's interface plan_route reads: its domains and its route
        config = type("Config", (), {"domains": ("math",)})()

        def route(self, probabilities):
            return {"math": float(probabilities[0])}, {}

    plan = plan_route("auto", ("math",), {"math": 1, "shouty": 1}, Router(), {"math": 0.9}, ("shouty",))
    assert plan.weights == {"math": pytest.approx(0.9)} and "not trained on" in plan.gated_off["shouty"]
    explicit = plan_route({"shouty": 0.5, "math": 1.0}, ("math",), {"math": 1, "shouty": 1}, Router(), None, ("shouty",))
    assert explicit.weights == {"math": 1.0, "shouty": 0.5}


@pytest.fixture
def run_time_root(zoo_dir, manifest_path, tmp_path_factory) -> Path:
    """The tiny zoo with no adapter in its manifest, and three PEFT folders in its adapter root."""
    root = tmp_path_factory.mktemp("run-time")
    shutil.copytree(zoo_dir / "artifacts", root / "artifacts")
    for name, config in {"shouty": ADAPTERS["r16-all"], "quiet": ADAPTERS["r4-attention"],
                         "dora": dict(r=4, target_modules=["q_proj"], use_dora=True)}.items():
        shutil.move(peft_adapter(root / "artifacts", name, **config, base="lm"), root / "adapters" / name)
    (root / "adapters" / "pickled").mkdir()
    shutil.copy(root / "adapters" / "quiet" / "adapter_config.json", root / "adapters" / "pickled")
    (root / "adapters" / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    write_manifest(load_manifest(manifest_path), root / "weights_manifest.yaml")
    return root


ADMIN = {"Authorization": "Bearer let-me-in"}


def test_adapters_load_and_unload_at_run_time_with_vllm_s_routes(run_time_root):
    manifest = run_time_root / "weights_manifest.yaml"
    settings = make_settings(manifest, admin_token="let-me-in", watch=False)
    request = {"prompt": "Hello there", "max_tokens": 6}
    with TestClient(create_app(settings, load_in_background=False)) as c:
        base = c.post("/chat", json=request | {"route": "none"}).json()["text"]
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "shouty"}).status_code == 401
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "shouty"},
                      headers={"Authorization": "Bearer nope"}).status_code == 403
        loaded = c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "shouty"}, headers=ADMIN)
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'shouty' added successfully."
        routed = c.post("/chat", json=request | {"route": {"shouty": 1.0}}).json()
        assert routed["trace"]["domains_applied"] == {"shouty": 1.0} and routed["text"] != base
        taken = c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "quiet"}, headers=ADMIN)
        assert taken.status_code == 409 and taken.json()["error"]["type"] == "conflict"
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "math", "lora_path": "quiet"}, headers=ADMIN).status_code == 409
        for path, reason in {"dora": "DoRA", "pickled": "pickle", "../artifacts/lm": "inside the adapter root",
                             "nowhere": "no adapter folder", "a\u0000b": "not a path"}.items():
            refused = c.post("/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": path}, headers=ADMIN)
            assert refused.status_code == 422 and reason in refused.json()["error"]["message"], (path, refused.text)
        assert [a.name for a in load_manifest(manifest).chat.adapters] == ["shouty"]  # a refused one is not recorded
        # in place: the new version serves; a refused new version leaves the old one serving
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "quiet", "load_inplace": True},
                      headers=ADMIN).status_code == 200
        quiet = c.post("/chat", json=request | {"route": {"shouty": 1.0}}).json()["text"]
        assert quiet != routed["text"]
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "dora", "load_inplace": True},
                      headers=ADMIN).status_code == 422
        assert c.post("/chat", json=request | {"route": {"shouty": 1.0}}).json()["text"] == quiet
        assert [a.source.path for a in load_manifest(manifest).chat.adapters] == ["adapters/quiet"]
    with TestClient(create_app(settings, load_in_background=False)) as c:  # a restart serves what was loaded
        assert c.post("/chat", json=request | {"route": {"shouty": 1.0}}).json()["text"] == quiet
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "nothing"}, headers=ADMIN).status_code == 404
        unloaded = c.post("/v1/unload_lora_adapter", json={"lora_name": "shouty"}, headers=ADMIN)
        assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'shouty' removed successfully."
        assert c.post("/chat", json=request | {"route": {"shouty": 1.0}}).status_code == 422
        assert load_manifest(manifest).chat.adapters == []
    off = make_settings(manifest, watch=False)  # no admin token: the routes are off, as the admin routes are
    with TestClient(create_app(off, load_in_background=False)) as c:
        response = c.post("/v1/load_lora_adapter", json={"lora_name": "shouty", "lora_path": "shouty"})
        assert response.status_code == 404 and "LOOPSTACK_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_load_and_unload_under_concurrent_requests_fail_none_and_a_running_answer_finishes(run_time_root):
    import threading
    from collections import Counter

    import httpx

    from tests.conftest import live_server
    from tests.test_streaming import sse_events

    settings = make_settings(run_time_root / "weights_manifest.yaml", admin_token="let-me-in", watch=False)
    with live_server(create_app(settings, load_in_background=False), settings) as url:
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "steady", "lora_path": "quiet"},
                          headers=ADMIN, timeout=60).status_code == 200
        stop, statuses = threading.Event(), Counter()

        def client(route) -> None:
            while not stop.is_set():
                response = httpx.post(f"{url}/chat", json={"prompt": "Hi", "max_tokens": 4, "route": route}, timeout=60)
                statuses[response.status_code] += 1

        clients = [threading.Thread(target=client, args=(route,)) for route in
                   ("none", "auto", {"steady": 1.0}, {"steady": 0.5, "math": 1.0})]
        for thread in clients:
            thread.start()
        finished = []
        try:
            for cycle in range(3):
                loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "churn", "lora_path": "shouty"},
                                    headers=ADMIN, timeout=60)
                assert loaded.status_code == 200, loaded.text
                body = {"prompt": "Tell me a story", "max_tokens": 24, "route": {"churn": 1.0}, "stream": True}
                with httpx.stream("POST", f"{url}/chat", json=body, timeout=60) as stream:
                    lines = stream.iter_lines()
                    seen = [next(lines) for _ in range(2)]  # the first token's event: the answer is under way
                    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "churn"}, headers=ADMIN,
                                          timeout=60)
                    assert unloaded.status_code == 200
                    rest = "\n".join(seen + list(lines))
                finished.append(sse_events(type("Streamed", (), {"text": rest})())[-1])
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
    assert set(statuses) == {200} and statuses[200] >= 8, statuses
    for name, done in finished:  # each answer begun before its adapter's unload ran to its end with it
        assert name == "done" and done["trace"]["domains_applied"] == {"churn": 1.0} and done["usage"]["completion_tokens"] > 1


def test_the_residency_keeps_the_cap_evicting_the_least_recently_used_adapter_no_running_row_uses(tiny):
    from server.chat.adapter_residency import AdapterResidency
    from server.metrics import Metrics

    chat = served_base(tiny)
    adapters = [load_adapter(peft_adapter(tiny, f"lru-{i}", seed=i, **ADAPTERS["r4-attention"]), f"lru-{i}",
                             chat.model, chat.name) for i in range(4)]
    a, b, c, d = adapters
    metrics = Metrics()
    residency = AdapterResidency(capacity=2, metrics=metrics)
    for adapter in adapters:
        residency.admit(adapter)
    assert [x.resident for x in adapters] == [False, False, True, True]  # the two admitted last
    expected = {name: w.lora_A.clone() for name, w in load_adapter(
        a.weights_file.parent, "again", chat.model, chat.name).weights().items()}
    residency.running([a, b, c])  # three running rows' adapters: past the cap, none of them may go
    assert [x.resident for x in adapters] == [True, True, True, False]
    assert all(torch.equal(a.weights()[n].lora_A, expected[n]) for n in expected)  # read back as it was
    residency.running([a])  # b and c no longer run: the least recently used of them goes
    assert [x.resident for x in adapters] == [True, False, True, False]
    value = lambda name, **labels: metrics.registry.get_sample_value(name, labels or None)
    assert value("loopstack_chat_adapters_resident") == 2 and value("loopstack_chat_adapters_running") == 1
    assert value("loopstack_chat_adapter_loads_total", result="loaded") == 2  # a and b, read back
    assert value("loopstack_chat_adapter_evictions_total", result="evicted") == 4  # a, b at admission; d; b
    assert value("loopstack_chat_adapter_evictions_total", result="deferred") == 1
    del d
    residency.forget(c)
    assert {x.name for x in residency.resident()} == {"lru-0"}


def test_past_the_cap_an_adapter_loads_at_its_next_use_and_a_changed_file_fails_only_its_rows(run_time_root):
    from server.manifest import Adapter as AdapterEntry

    manifest_file = run_time_root / "weights_manifest.yaml"
    manifest = load_manifest(manifest_file)
    entries = [AdapterEntry(name=n, source=recorded_source(run_time_root, f"adapters/{n}")) for n in ("shouty", "quiet")]
    write_manifest(manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"adapters": entries})}),
                   manifest_file)
    request = {"prompt": "Hello there", "max_tokens": 6}
    with TestClient(create_app(make_settings(manifest_file, watch=False), load_in_background=False)) as c:
        every = {n: c.post("/chat", json=request | {"route": {n: 1.0}}).json()["text"] for n in ("shouty", "quiet")}
    capped = make_settings(manifest_file, watch=False, max_loaded_adapters=1)
    with TestClient(create_app(capped, load_in_background=False)) as c:
        resident = lambda: {n: a["resident"] for n, a in next(m for m in c.get("/v1/models").json()["data"]
                                                              if m["id"] == "tiny-lm")["details"]["adapters"].items()}
        assert resident() == {"shouty": False, "quiet": True}
        assert c.post("/chat", json=request | {"route": {"shouty": 1.0}}).json()["text"] == every["shouty"]
        assert resident() == {"shouty": True, "quiet": False}
        assert c.post("/chat", json=request | {"route": {"quiet": 1.0}}).json()["text"] == every["quiet"]
        metrics = c.get("/metrics").text
        assert 'loopstack_chat_adapter_loads_total{result="loaded"} 2.0' in metrics
        assert "loopstack_chat_adapters_resident 1.0" in metrics
        weights = run_time_root / "adapters" / "shouty" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # changed on disk while evicted
        broken = c.post("/chat", json=request | {"route": {"shouty": 1.0}})
        assert broken.status_code == 503 and "sha256" in broken.json()["error"]["message"]
        assert c.post("/chat", json=request | {"route": "none"}).status_code == 200
        assert c.post("/chat", json=request | {"route": {"quiet": 1.0}}).json()["text"] == every["quiet"]


def test_a_manifest_names_each_domain_and_adapter_once(manifest_path):
    from pydantic import ValidationError

    chat = load_manifest(manifest_path).chat
    folder = recorded_source(manifest_path.parent, "artifacts/lm")  # any recorded folder: only names are checked
    for adapters, problem in ([Adapter(name="math", source=folder)], "has the name of a domain"),\
                             ([Adapter(name="a", source=folder), Adapter(name="a", source=folder)], "duplicate adapter"):
        with pytest.raises(ValidationError, match=problem):
            type(chat).model_validate({**chat.model_dump(), "adapters": [a.model_dump() for a in adapters]})


def test_the_adapters_bench_runs_end_to_end_and_reports_what_it_claims(run_time_root, tmp_path):
    from bench.adapters import measure, table
    from server.settings import Settings

    settings = Settings(manifest=run_time_root / "weights_manifest.yaml", artifact_root=run_time_root, device="cpu",
                        _env_file=None)
    report = measure(settings, tmp_path, tokens=2, registered=11, cap=4, rounds=1)
    rows = report["throughput"]
    assert list(rows) == ["base engine (route none)", "8 clients, one shared adapter", "8 clients, 8 different adapters"]
    assert all(r["failed"] == 0 and r["tokens"] == 8 * 2 for r in rows.values())  # exactly the tokens asked
    assert rows["base engine (route none)"]["vs_base"] == 1.0 and len(report["load_to_first_token_s"]) == 3
    # memory against the base engine's own peak under the same clients, before any adapter was loaded
    assert report["rss_base_bytes"] == rows["base engine (route none)"]["rss_peak_bytes"] >= report["rss_idle_bytes"]
    assert report["churn"]["rss_allowed_bytes"] == report["rss_base_bytes"] + 1.1 * 4 * report["adapter_bytes"]
    churn = report["churn"]
    assert churn["cycles"] == 20 and not churn["cycle_failures"] and churn["failed"] == 0
    assert churn["evictions"] > 0 and churn["resident"] <= 8  # past the cap only while rows run on them
    assert not (run_time_root / "bench-adapters").exists()  # its adapters are removed
    assert load_manifest(run_time_root / "weights_manifest.yaml").chat.adapters == []  # the bench's own manifest
    assert "different adapters" in table(report)
