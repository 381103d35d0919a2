"""The chat base in 4-bit NF4 through transformers + bitsandbytes, and POST /chat with its trace."""

from __future__ import annotations

import shutil

import bitsandbytes as bnb
import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import make_settings
from server.app import create_app
from server.chat.decoding import ChatJob, generate
from server.chat.model import load_chat, load_chat_base
from server.chat.moe_lora import MoELoRAConfig
from server.chat.stack_files import save_stack
from server.manifest import Artifact, ArtifactResolver, Domain, load_manifest, write_manifest
from server.artifacts import ArtifactError, sha256_file
from server.metrics import Metrics
from server.registry import Registry
from training.brainstacks.stacks import add_stack, freeze, stack_modules


def test_nf4_load_yields_bitsandbytes_4bit_layers(manifest_path):
    manifest = load_manifest(manifest_path)
    resolver = ArtifactResolver(manifest_path.parent)
    chat = load_chat_base(manifest.chat.base, resolver, "cpu")
    quantised = [m for m in chat.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers
    assert all(m.weight.quant_type == "nf4" for m in quantised)
    assert quantised[0].weight.dtype == torch.uint8  # packed 4-bit storage

    plain = load_chat_base(manifest.chat.base.model_copy(update={"quantization": "none"}), resolver, "cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.model.modules())


def test_chat_answers_with_usage_and_trace(client):
    response = client.post("/chat", json={"prompt": "What is 3 + 4?", "max_tokens": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-lm" and isinstance(body["text"], str)
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["finish_reason"] in {"stop", "length"}
    trace = body["trace"]
    assert trace["route_requested"] == "auto" and trace["domains_applied"] == {}
    assert set(trace["gated_off"]) == {"chat", "math"}
    assert trace["router_probabilities"] is None and "base model" in trace["reason"]
    assert 0 <= trace["time_to_first_token_seconds"] <= trace["generation_seconds"]


def test_route_none_is_reported_in_the_trace(client):
    trace = client.post("/chat", json={"prompt": "hi", "max_tokens": 2, "route": "none"}).json()["trace"]
    assert trace["gated_off"] == {"chat": "route 'none'", "math": "route 'none'"}
    assert "'none'" in trace["reason"]


def test_sampled_replies_repeat_with_the_same_seed(client):
    request = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
               "max_tokens": 12, "temperature": 1.0, "seed": 3}
    first = client.post("/chat", json=request).json()
    second = client.post("/chat", json=request).json()
    assert first["text"] == second["text"] and first["seed"] == 3
    others = {client.post("/chat", json=request | {"seed": s}).json()["text"] for s in range(4, 9)}
    assert len(others | {first["text"]}) > 1  # the seed matters: an untrained LM samples widely


def test_greedy_decoding_is_deterministic_without_a_seed(client):
    request = {"prompt": "Add 12 and 30", "max_tokens": 8}
    assert client.post("/chat", json=request).json()["text"] == client.post("/chat", json=request).json()["text"]


@pytest.fixture(scope="module")
def stacked_manifest(zoo_dir, manifest_path, tmp_path_factory):
    """The tiny zoo plus one trained-looking (random, non-zero) math stack in the manifest."""
    root = tmp_path_factory.mktemp("stacked")
    shutil.copytree(zoo_dir / "artifacts", root / "artifacts")
    manifest = load_manifest(manifest_path)
    resolver = ArtifactResolver(manifest_path.parent)
    model = load_chat_base(manifest.chat.base, resolver, "cpu").model
    config = MoELoRAConfig(experts=4, rank=4, alpha=4.0)
    stacks = add_stack(model, "math", config)
    torch.manual_seed(0)
    for stack in stacks:
        torch.nn.init.normal_(stack.lora_B, std=0.5)
    freeze(stacks)
    path = root / "artifacts" / "stacks" / "math-1.safetensors"
    path.parent.mkdir()
    save_stack(path, stack_modules(model, "math", 0), "math", config, {"round": 1})
    domains = [Domain(name="chat", order=0),
               Domain(name="math", order=1, stacks=[Artifact(path="artifacts/stacks/math-1.safetensors",
                                                             sha256=sha256_file(path))])]
    stacked = manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"domains": domains})})
    write_manifest(stacked, root / "weights_manifest.yaml")
    return root / "weights_manifest.yaml"


def test_explicit_routes_apply_stacks_and_the_trace_names_them(stacked_manifest):
    with TestClient(create_app(make_settings(stacked_manifest), load_in_background=False)) as c:
        request = {"prompt": "Compute 23 + 45 - 12.", "max_tokens": 6}
        routed_reply = c.post("/chat", json=request | {"route": {"math": 1.0}}).json()
        base_reply = c.post("/chat", json=request | {"route": "none"}).json()
        auto_reply = c.post("/chat", json=request).json()
        zero = c.post("/chat", json=request | {"route": {"math": 0.0, "chat": 1.0}}).json()["trace"]
        metrics = c.get("/metrics").text
    # one explicit request applied math at weight 1; "none", "auto" (no router) and weight 0 applied nothing
    assert 'loopstack_chat_domain_applied_total{domain="math",route="explicit"} 1.0' in metrics
    assert 'loopstack_chat_domain_weight_bucket{domain="math",le="0.9"} 0.0' in metrics
    assert 'loopstack_chat_domain_weight_bucket{domain="math",le="1.0"} 1.0' in metrics
    assert 'route="auto"' not in metrics and "loopstack_chat_router_probability_count" not in metrics
    trace = routed_reply["trace"]
    assert trace["domains_applied"] == {"math": 1.0}
    assert trace["gated_off"] == {"chat": "not in the requested route"} and "math x 1" in trace["reason"]
    assert zero["domains_applied"] == {} and zero["gated_off"] == {
        "chat": "no stacks are loaded for this domain", "math": "weight 0 requested"}
    assert "meta-router" in auto_reply["trace"]["gated_off"]["math"]
    assert routed_reply["text"] != base_reply["text"] and auto_reply["text"] == base_reply["text"]

    # the trace's weights are what was applied: the same weights outside the server give the same text
    manifest = load_manifest(stacked_manifest)
    chat = load_chat(manifest.chat, ArtifactResolver(stacked_manifest.parent), "cpu")
    job = ChatJob([{"role": "user", "content": request["prompt"]}], 6, 0.0, 1.0, 0)
    assert generate(chat, job, trace["domains_applied"]).text == routed_reply["text"]
    assert generate(chat, job).text == base_reply["text"]
    plan = chat.plan_route(job.route, job.messages)  # the job's own route: "auto", no router loaded
    assert plan.weights == {} and generate(chat, job, plan.weights).text == base_reply["text"]


def test_a_stack_listed_under_the_wrong_domain_is_refused(stacked_manifest, tmp_path):
    manifest = load_manifest(stacked_manifest)
    swapped = [d.model_copy(update={"stacks": manifest.chat.domains[1 - i].stacks})
               for i, d in enumerate(manifest.chat.domains)]
    bad = tmp_path / "weights_manifest.yaml"
    shutil.copytree(stacked_manifest.parent / "artifacts", tmp_path / "artifacts")
    write_manifest(manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"domains": swapped})}), bad)
    with pytest.raises(ArtifactError, match="stack of domain 'math', listed under 'chat'"):
        load_chat(load_manifest(bad).chat, ArtifactResolver(bad.parent), "cpu")
    registry = Registry(make_settings(bad), Metrics())
    registry.reload()  # the server refuses those two domains' stacks and serves the rest
    served = registry.current.chat
    assert served is not None and {d: s.count for d, s in served.stacks.items()} == {"math": 0}
    assert "listed under 'chat'" in registry.entry("tiny-lm/stacks/chat").error


@pytest.fixture(scope="module")
def tiny_chat(manifest_path):
    manifest = load_manifest(manifest_path)
    return load_chat_base(manifest.chat.base, ArtifactResolver(manifest_path.parent), "cpu")


def test_max_tokens_is_fitted_to_the_context_the_prompt_leaves(tiny_chat):
    from server.chat.serving import plan_job
    from server.errors import ApiError
    from server.schemas.chat import ChatRequest
    from server.settings import Settings

    settings = Settings(_env_file=None, default_max_tokens=100)
    assert tiny_chat.context_length == 512
    words = "cat " * 20
    prompt_tokens = tiny_chat.encode([{"role": "user", "content": words}]).shape[1]
    room = 512 - prompt_tokens
    long_words = "cat " * (room + 500)  # a prompt alone longer than the context
    with pytest.raises(ApiError) as refused:
        plan_job(ChatRequest(prompt=long_words), tiny_chat, settings.model_copy(update={"max_prompt_chars": 10**6}))
    assert refused.value.status == 422 and refused.value.param == "prompt" and "context of 512 tokens" in str(refused.value)
    job = plan_job(ChatRequest(prompt=words), tiny_chat, settings)
    assert job.max_new_tokens == 100 and job.input_ids.shape[1] == prompt_tokens  # the default when it fits
    job = plan_job(ChatRequest(prompt=words), tiny_chat, settings.model_copy(update={"default_max_tokens": 10**4,
                                                                                    "max_new_tokens": 10**4}))
    assert job.max_new_tokens == room  # the default is cut to what is left
    assert plan_job(ChatRequest(prompt=words, max_tokens=room), tiny_chat,
                    settings.model_copy(update={"max_new_tokens": 10**4})).max_new_tokens == room
    with pytest.raises(ApiError) as refused:
        plan_job(ChatRequest(prompt=words, max_tokens=room + 1), tiny_chat, settings.model_copy(update={"max_new_tokens": 10**4}))
    assert refused.value.param == "max_tokens" and f"which leaves {room}" in str(refused.value)


def test_a_prompt_over_the_token_bound_is_refused_whatever_its_characters(tiny_chat):
    """Characters do not bound a prompt's cost: 57 KB of "7 7 7 ..." read as 8,047 tokens on SmolLM2."""
    from server.chat.serving import plan_job
    from server.errors import ApiError
    from server.schemas.chat import ChatRequest
    from server.settings import Settings

    settings = Settings(_env_file=None, max_prompt_tokens=40)
    request = ChatRequest(messages=[{"role": "user", "content": "7 " * 30}] * 2)  # 60 characters a message
    with pytest.raises(ApiError) as refused:
        plan_job(request, tiny_chat, settings)
    assert refused.value.status == 422 and refused.value.param == "messages" and "at most 40" in str(refused.value)
    assert plan_job(ChatRequest(prompt="7 " * 5), tiny_chat, settings).input_ids.shape[1] <= 40


def test_context_and_template_refusals_are_422_over_http(client):
    body = {"prompt": "7 " * 900, "max_tokens": 4}  # within the 2000-character bound, beyond 512 tokens
    error = client.post("/chat", json=body)
    assert error.status_code == 422 and error.json()["error"]["param"] == "prompt"
    assert "512 tokens" in error.json()["error"]["message"]
    error = client.post("/chat", json={"prompt": "hi", "max_tokens": 256, "stop": ["a", "b", "c", "d", "e"]})
    assert error.status_code == 422 and error.json()["error"]["param"] == "stop"


def test_a_conversation_the_template_refuses_is_a_422(tiny_chat):
    from server.chat.serving import plan_job
    from server.errors import ApiError
    from server.schemas.chat import ChatRequest
    from server.settings import Settings

    template = tiny_chat.tokenizer.chat_template
    tiny_chat.tokenizer.chat_template = (  # Gemma's templates refuse a system turn like this
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + template)
    try:
        request = ChatRequest(messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])
        with pytest.raises(ApiError) as refused:
            plan_job(request, tiny_chat, Settings(_env_file=None))
        assert refused.value.status == 422 and "System role not supported" in str(refused.value)
    finally:
        tiny_chat.tokenizer.chat_template = template


def test_stop_sequences_end_the_answer_before_them(client):
    request = {"prompt": "Hello! How can I help you today?", "max_tokens": 16}
    free = client.post("/chat", json=request).json()
    assert free["finish_reason"] == "length" and len(free["text"]) > 6, free
    stop = free["text"][4:6]  # a piece of what the model says unstopped
    stopped = client.post("/chat", json={**request, "stop": [stop, "never said"]}).json()
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][:free["text"].index(stop)].strip()
    assert stopped["usage"]["completion_tokens"] < free["usage"]["completion_tokens"]
