"""Structured output: every answer held to a JSON schema parses and validates, with rows of
different schemas and rows without one decoded in one batch; an answer cut by max_tokens is not
claimed valid; what cannot be enforced is a 422 that names it."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat.decoding import generate
from server.chat.structured import output_format
from server.metrics import Metrics
from server.schemas.chat import ResponseFormat
from tests.conftest import assert_error_shape, make_settings
from tests.test_batching import answered_together, chat_with_stacks, job, started_engine

# Schemas whose documents are bounded (enums, booleans, bounded integers and arrays), so that even a
# random tiny model must finish one within max_tokens: every answer has to parse and validate.
SCHEMAS = {
    "sentiment": {"type": "object", "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]}, "urgent": {"type": "boolean"}},
        "required": ["label", "urgent"], "additionalProperties": False},
    "ticket": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {
            "type": "integer", "minimum": 0, "maximum": 100}}, "required": ["ok", "score"], "additionalProperties": False}},
        "required": ["tags", "meta"], "additionalProperties": False},
    "point": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "minItems": 2, "maxItems": 2},
}
FREE_TEXT = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


def fmt(name: str | None, schema: dict | None = None) -> ResponseFormat:
    if name is None:
        return ResponseFormat(type="json_object")
    return ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": name, "schema": schema}})


def test_mixed_rows_in_one_batch_each_keep_their_own_format(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    prompts = ("What is 3 + 4?", "Name a colour", "Tell me about the sea", "hi")
    rows = [(prompt, name, route) for prompt in prompts for name, route in
            (("sentiment", {}), ("ticket", {"math": 1.0}), ("point", {"chat": 0.5}), (None, {}))]
    jobs = [job(prompt, route, max_new_tokens=96, output_format=None if name is None else output_format(
        fmt(name, SCHEMAS[name]), chat)) for prompt, name, route in rows]
    jobs += [job("Tell me about the sea", {"math": 1.0}, max_new_tokens=12)]  # a plain row beside them
    metrics = Metrics()
    engine = started_engine(metrics=metrics, max_waiting=16)
    results = answered_together(engine, chat, jobs)
    assert metrics.registry.get_sample_value("loopstack_chat_batch_rows_sum") / metrics.registry.get_sample_value(
        "loopstack_chat_batch_rows_count") > 4  # decoded together
    for (prompt, name, _), result in zip(rows, results):
        if name is None:  # a row without a format, between them
            assert result.format_complete is None
            continue
        assert result.finish_reason == "stop" and result.format_complete, (prompt, name, result.text)
        document = json.loads(result.text)
        jsonschema.validate(document, SCHEMAS[name])
    plain = results[-1]
    alone = generate(chat, jobs[-1], jobs[-1].route)
    assert (plain.text, plain.format_complete) == (alone.text, None)  # unconstrained rows are left alone


def test_json_object_answers_are_objects_or_say_they_were_cut(manifest_path, tmp_path):
    chat = chat_with_stacks(manifest_path, tmp_path, "none")
    answers = [generate(chat, job(p, {}, max_new_tokens=48, output_format=output_format(fmt(None), chat)), {})
               for p in ("hi", "Name a colour", "What is 3 + 4?")]
    for answer in answers:
        assert answer.text.startswith("{")
        if answer.format_complete:
            assert isinstance(json.loads(answer.text), dict) and answer.finish_reason == "stop"
        else:
            assert answer.finish_reason == "length"


def test_an_answer_cut_by_max_tokens_is_not_claimed_valid_over_http(manifest_path):
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as client:
        body = {"prompt": "Tell me a story", "max_tokens": 3, "response_format": {
            "type": "json_schema", "json_schema": {"name": "story", "schema": FREE_TEXT}}}
        cut = client.post("/chat", json=body).json()
        assert cut["finish_reason"] == "length"
        assert cut["trace"]["response_format"] == {"type": "json_schema", "name": "story", "complete": False}
        with pytest.raises(json.JSONDecodeError):
            json.loads(cut["text"])


@pytest.mark.parametrize("stream", [False, True])
def test_both_apis_enforce_a_schema_and_trace_it(manifest_path, stream):
    schema = SCHEMAS["ticket"]
    fmt_body = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema, "strict": True}}
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as client:
        model = client.get("/v1/models").json()["data"]
        chat_model = next(m["id"] for m in model if m.get("object") == "model" and "+" not in m["id"]
                          and ":" not in m["id"] and not m["id"].startswith("tiny-dit") and "pixart" not in m["id"])
        if stream:
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": chat_model, "stream": True, "max_tokens": 96, "temperature": 0,
                    "messages": [{"role": "user", "content": "File a ticket"}], "response_format": fmt_body}) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            last = next(c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason"))
            trace = last["loopstack"]["trace"]
        else:
            answer = client.post("/v1/chat/completions", json={
                "model": chat_model, "max_tokens": 96, "temperature": 0,
                "messages": [{"role": "user", "content": "File a ticket"}], "response_format": fmt_body}).json()
            text, trace = answer["choices"][0]["message"]["content"], answer["loopstack"]["trace"]
        jsonschema.validate(json.loads(text), schema)
        assert trace["response_format"] == {"type": "json_schema", "name": "ticket", "complete": True}
        native = client.post("/chat", json={"prompt": "File a ticket", "max_tokens": 96,
                                            "response_format": fmt_body}).json()
        jsonschema.validate(json.loads(native["text"]), schema)
        assert client.post("/chat", json={"prompt": "hi", "max_tokens": 4}).json()["trace"]["response_format"] is None


@pytest.mark.parametrize("response_format, named", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "if": {"required": ["a"]}, "then": {}}}}, "if"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "json_schema"),
    ({"type": "yaml"}, "type"),
])
def test_what_cannot_be_enforced_is_a_422_that_names_it(manifest_path, response_format, named):
    with TestClient(create_app(make_settings(manifest_path), load_in_background=False)) as client:
        refused = client.post("/chat", json={"prompt": "hi", "response_format": response_format})
        assert named in assert_error_shape(refused, 422)["message"]
        assert client.post("/chat", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
