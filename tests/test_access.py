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
    assert [r.request_id for r in lines] == ["r-chat"] and "POST /chat 200" in lines[0].getMessage()


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
