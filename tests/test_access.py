"""API keys, per-key rate limits, request ids, CORS and the env file: what an operator turns on."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from server.access import TokenBuckets
from server.app import create_app
from server.settings import Settings
from tests.conftest import assert_error_shape, make_settings

CHAT = {"prompt": "hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def keyed(manifest_path):
    settings = make_settings(manifest_path, api_keys="alpha-key, beta-key", rate_limit_per_minute=3)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        yield c


def test_public_routes_need_a_known_key_and_probes_do_not(keyed):
    error = assert_error_shape(keyed.post("/chat", json=CHAT), 401)
    assert "Bearer" in error["message"] and keyed.post("/chat", json=CHAT).headers["WWW-Authenticate"] == "Bearer"
    assert_error_shape(keyed.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                                  json={"model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}]}), 401)
    assert keyed.post("/chat", json=CHAT, headers={"Authorization": "Bearer beta-key"}).status_code == 200
    for path in ("/livez", "/readyz", "/metrics", "/v1/models"):
        assert keyed.get(path).status_code == 200, path


def test_each_key_has_its_own_rate_limit_with_retry_after(keyed):
    alpha = {"Authorization": "Bearer alpha-key"}
    statuses = [keyed.post("/chat", json=CHAT, headers=alpha).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # a burst of a minute's allowance (3), then refused
    refused = keyed.post("/chat", json=CHAT, headers=alpha)
    assert assert_error_shape(refused, 429)["type"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20  # a token every 20 s
    # another key is not held back by alpha's use (beta spent one in the test before, if it ran first)
    assert keyed.post("/chat", json=CHAT, headers={"Authorization": "Bearer beta-key"}).status_code == 200


def test_token_buckets_refill_at_their_rate(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("server.access.time.monotonic", lambda: clock[0])
    buckets = TokenBuckets(per_minute=6)  # a token every 10 s
    assert [buckets.take("k") for _ in range(6)] == [0.0] * 6
    assert buckets.take("k") == pytest.approx(10.0)
    clock[0] += 5.0
    assert buckets.take("k") == pytest.approx(5.0)
    clock[0] += 5.0
    assert buckets.take("k") == 0.0 and buckets.take("other") == 0.0


def test_a_request_id_comes_back_and_is_on_the_log_lines_of_its_request(client, caplog):
    from server.access import RequestIdFilter

    given = client.get("/livez", headers={"X-Request-ID": "trace-123"})
    assert given.headers["X-Request-ID"] == "trace-123"
    made = client.get("/livez", headers={"X-Request-ID": "bad id with spaces\n"}).headers["X-Request-ID"]
    assert made != "bad id with spaces\n" and len(made) == 16
    assert_error_shape(client.get("/nowhere", headers={"X-Request-ID": "r-404"}), 404)
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="server.access"):
        client.post("/chat", json=CHAT, headers={"X-Request-ID": "r-chat"})
    lines = [r for r in caplog.records if r.name == "server.access"]
    assert [r.request_id for r in lines] == ["r-chat"] and 'POST "/chat" 200' in lines[0].getMessage()


def test_cors_is_off_by_default_and_answers_the_configured_origins(client, manifest_path):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/chat", headers=preflight).headers
    settings = make_settings(manifest_path, cors_origins="https://app.example")
    with TestClient(create_app(settings, load_in_background=False)) as c:
        answer = c.options("/chat", headers={**preflight, "Access-Control-Request-Headers": "authorization"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/chat", headers={**preflight, "Origin": "https://elsewhere.example"})
        assert other.headers.get("access-control-allow-origin") != "https://elsewhere.example"


def test_no_env_file_is_read_unless_named(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("LOOPSTACK_MAX_STEPS=7\n")
    monkeypatch.chdir(tmp_path)
    assert Settings().max_steps == 200
    assert Settings(_env_file=tmp_path / ".env").max_steps == 7


def test_json_logs_are_one_object_a_line_with_the_request_id():
    import json

    from server.access import REQUEST_ID, JsonFormatter, RequestIdFilter

    record = logging.LogRecord("server", logging.WARNING, __file__, 1, "queue %s full", ("chat",), None)
    token = REQUEST_ID.set("r-7")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["message"], entry["request_id"]) == (
        "WARNING", "server", "queue chat full", "r-7")


def test_a_path_cannot_forge_log_lines_or_write_terminal_escapes(client):
    import io

    from server.access import JsonFormatter, RequestIdFilter

    text, json_lines = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(json_lines)]
    handlers[0].setFormatter(logging.Formatter("%(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    handlers[1].setFormatter(JsonFormatter())
    access = logging.getLogger("server.access")
    for handler in handlers:
        handler.addFilter(RequestIdFilter())
        access.addHandler(handler)
    previous = access.level
    access.setLevel(logging.INFO)
    try:
        client.get("/x%0a2026-12-06 04:44:00,000 INFO server.access [deadbeef]: POST /admin/reload 200")
        client.get("/y%1b[31mred")
    finally:
        access.setLevel(previous)
        for handler in handlers:
            access.removeHandler(handler)
    lines = text.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("INFO server.access [") for line in lines)
    assert '"/x\\n2026-12-06' in lines[0] and "\x1b" not in text.getvalue()
    assert '"/y\\x1b[31mred" 404' in lines[1]
    assert len(json_lines.getvalue().splitlines()) == 2 and "\x1b" not in json_lines.getvalue()


def test_responses_refused_by_the_middleware_are_counted(keyed):
    def count(status: str) -> float:
        return keyed.app.state.services.metrics.registry.get_sample_value(
            "loopstack_requests_total", {"endpoint": "/chat", "status": status}) or 0.0

    unauthorized, limited = count("401"), count("429")
    assert_error_shape(keyed.post("/chat", json=CHAT), 401)
    gamma = {"Authorization": "Bearer beta-key"}
    statuses = [keyed.post("/chat", json=CHAT, headers=gamma).status_code for _ in range(5)]
    assert 429 in statuses
    assert count("401") == unauthorized + 1 and count("429") == limited + statuses.count(429)


def test_a_rate_limit_without_keys_holds_each_client_address_and_says_so_at_start(manifest_path, caplog):
    with caplog.at_level(logging.INFO, logger="server.app"):
        with TestClient(create_app(make_settings(manifest_path, rate_limit_per_minute=3),
                                   load_in_background=False)) as c:
            statuses = [c.post("/chat", json=CHAT).status_code for _ in range(5)]
            assert c.get("/readyz").status_code == 200  # probes are not limited
    assert statuses == [200, 200, 200, 429, 429]
    assert any("per client address" in r.getMessage() for r in caplog.records)


def test_operator_details_in_the_model_list_need_the_admin_token(zoo_dir, tmp_path):
    import json
    import shutil

    from server.manifest import Source, load_manifest, write_manifest

    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    path = tmp_path / "weights_manifest.yaml"
    manifest = load_manifest(zoo_dir / "weights_manifest.yaml")
    bad = [m.model_copy(update={"source": Source(path="../outside", files=m.source.files)}) if m.name == "tiny-dit"
           else m for m in manifest.image]
    write_manifest(manifest.model_copy(update={"image": bad}), path)
    (tmp_path / "build.json").write_text(json.dumps({"state": "running", "pid": 4242, "current": "images"}))
    settings = make_settings(path, api_keys="alpha-key", admin_token="s3cret")
    with TestClient(create_app(settings, load_in_background=False)) as c:
        public = c.get("/v1/models", headers={"Authorization": "Bearer alpha-key"}).json()
        operator = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()
    card = next(m for m in public["data"] if m["id"] == "tiny-dit")
    assert card["status"] == "failed" and card["errors"] == [{"entry": "tiny-dit"}]
    assert public["build"] == {"state": "running", "current": "images"}
    card = next(m for m in operator["data"] if m["id"] == "tiny-dit")
    assert "outside the artifact root" in card["errors"][0]["reason"] and operator["build"]["pid"] == 4242


def test_admin_routes_are_in_the_schema_only_when_on(manifest_path):
    for token, shown in ((None, False), ("s3cret", True)):
        app = create_app(make_settings(manifest_path, admin_token=token))
        paths = app.openapi()["paths"]
        assert ("/admin/reload" in paths) is shown and ("/admin/status" in paths) is shown


def test_a_body_that_is_not_json_gets_415(client):
    for headers in ({"content-type": "text/plain"}, {}):
        answer = client.post("/chat", content=b'{"prompt": "hi"}', headers=headers)
        assert assert_error_shape(answer, 415)["type"] == "unsupported_media_type"
    assert client.post("/chat", content=b'{"prompt": "hi", "max_tokens": 1}',
                       headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_a_deadline_too_short_to_mean_anything_is_refused_by_the_schema(client):
    answer = client.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "timeout": 5e-324})
    assert_error_shape(answer, 422, "timeout")
