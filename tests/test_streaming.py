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
