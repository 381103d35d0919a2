"""OpenAI's own Python client against the server: models, chat completions plain and streamed, and
refusals in the one error shape (which OpenAI's client reads as its own)."""

from __future__ import annotations

import httpx2
import openai
import pytest

from tests.conftest import assert_error_shape


class InProcessTransport(httpx2.BaseTransport):
    """OpenAI's client (on httpx2) sending to the app in-process, through Starlette's test client."""

    def __init__(self, client):
        self.client = client

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        reply = self.client.request(request.method, str(request.url), headers=headers, content=request.read())
        return httpx2.Response(reply.status_code, headers=list(reply.headers.items()), content=reply.content,
                               request=request)


@pytest.fixture()
def oai(client):
    return openai.OpenAI(api_key="unused", base_url="http://testserver/v1", max_retries=0,
                         http_client=httpx2.Client(transport=InProcessTransport(client)))


def test_models_are_listed_in_openai_shape_with_route_aliases(oai, client):
    listed = {m.id: m for m in oai.models.list().data}
    assert {"tiny-lm", "tiny-lm:auto", "tiny-lm:none", "tiny-lm+chat", "tiny-lm+math"} <= set(listed)
    assert all(m.object == "model" and m.owned_by == "loopstack" and m.created > 0 for m in listed.values())
    raw = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert raw["tiny-lm"]["domains"] == ["chat", "math"] and raw["tiny-lm+math"]["route"] == {"math": 1.0}
    assert raw["tiny-lm:none"]["route"] == "none" and raw["tiny-lm"]["kind"] == "causal-lm"


def test_chat_completion_matches_the_native_answer_and_carries_the_trace(oai, client):
    native = client.post("/chat", json={"prompt": "What is 3 + 4?", "max_tokens": 6, "route": {"math": 1.0}}).json()
    completion = oai.chat.completions.create(model="tiny-lm+math", messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                             max_tokens=6, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "tiny-lm+math" and choice.message.role == "assistant"
    assert choice.message.content == native["text"] and choice.finish_reason == native["finish_reason"]
    assert completion.usage.total_tokens == native["usage"]["total_tokens"]
    trace = completion.model_extra["loopstack"]["trace"]
    assert trace["route_requested"] == {"math": 1.0} and trace["domains_applied"] == native["trace"]["domains_applied"]
    # the route in the extra body, on the plain model, is the same request
    again = oai.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                        max_tokens=6, temperature=0, extra_body={"route": {"math": 1.0}})
    assert again.choices[0].message.content == choice.message.content


def test_streamed_completion_adds_up_to_the_plain_one_and_ends_with_usage(oai):
    request = dict(model="tiny-lm:none", messages=[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Tell me about the sea"}],
                   max_tokens=10, temperature=0)
    plain = oai.chat.completions.create(**request)
    chunks = list(oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finished[0].model_extra["loopstack"]["trace"]["route_requested"] == "none"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=2), "n"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(logprobs=True), "logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(extra_body={"route": {"astrology": 1.0}}), "route"),
    (dict(extra_body={"route": "none"}, model="tiny-lm+math"), "route"),
    (dict(extra_body={"temperatur": 0.5}), "temperatur"),
])
def test_unsupported_values_are_refused_in_the_error_shape(oai, kwargs, param):
    request = dict(model="tiny-lm", messages=[{"role": "user", "content": "hi"}], max_tokens=2) | kwargs
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        oai.chat.completions.create(**request)
    assert refused.value.status_code == 422 and refused.value.body["param"] == param


def test_an_unknown_model_or_domain_alias_is_not_found(oai):
    for model in ("gpt-4o", "tiny-lm+astrology"):
        with pytest.raises(openai.NotFoundError) as missing:
            oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert missing.value.body["param"] == "model"


def test_image_generation_in_openai_shape_matches_the_native_images(oai, client):
    import base64

    native = client.post("/generate-image", json={"model": "tiny-dit", "class_label": 0, "seed": 4, "n": 2}).json()
    names = client.get("/v1/models").json()["data"]
    first_class = next(m for m in names if m["id"] == "tiny-dit")["details"]["classes"][0]
    generated = oai.images.generate(model="tiny-dit", prompt=first_class, n=2, response_format="b64_json",
                                    extra_body={"seed": 4})
    assert [d.b64_json for d in generated.data] == native["images"]
    assert base64.b64decode(generated.data[0].b64_json).startswith(b"\x89PNG")
    ran = generated.model_extra["loopstack"]
    assert (ran["mode"], ran["steps"], ran["seeds"]) == (native["mode"], native["steps"], [4, 5])
    assert ran["block_evaluations"] == native["block_evaluations"] and generated.size == f"{ran['width']}x{ran['height']}"


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(prompt="a cat"), 422, "prompt"),  # not one of a class-conditional model's classes
    (dict(response_format="url"), 422, "response_format"),
    (dict(size="big"), 422, "size"),
    (dict(model="dall-e-3"), 404, "model"),
])
def test_image_generation_refusals_name_their_field(oai, kwargs, status, param):
    request = dict(model="tiny-dit", prompt="0", extra_body={"class_label": 0}) | kwargs
    if param == "prompt":
        request.pop("extra_body")
    with pytest.raises(openai.APIStatusError) as refused:
        oai.images.generate(**request)
    assert refused.value.status_code == status and refused.value.body["param"] == param


def test_an_unknown_model_is_one_error_on_native_and_openai_routes(client):
    """The served-model lookup is one module: every route names an unknown model the same way."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answers = [
        client.post("/generate-image", json={"model": "no-such-model", "class_label": 1}),
        client.post("/v1/images/generations", json={"model": "no-such-model", "prompt": "one"}),
        client.post("/chat", json=chat | {"model": "no-such-model"}),
        client.post("/v1/chat/completions", json=chat | {"model": "no-such-model"}),
        client.post("/v1/chat/completions", json=chat | {"model": "tiny-lm+astrology"}),
    ]
    errors = [assert_error_shape(a, 404, "model") for a in answers]
    assert {e["type"] for e in errors} == {"model_not_found"}
