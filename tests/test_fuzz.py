"""Property-based fuzzing of every endpoint from the server's own OpenAPI schema (schemathesis), on
the tiny zoo: no request that the schema allows may get a 5xx (but the documented 504 of a request
whose own `timeout` passed), and every response must match the schema (status, content type,
body). The generators get the served model names and domains (a
random string would only ever reach the 404 and 422 paths).

The run is fixed-seed (derandomized) and sized for CI: 500 cases an operation and phase, about two
minutes on 2 cores; LOOPSTACK_FUZZ_EXAMPLES sets another number (the reported run: 1,300)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.hooks import HookDispatcher, HookScope
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from server.api import ROUTERS
from server.app import create_app
from tests.conftest import make_settings

ADMIN_TOKEN = "fuzz-admin"
EXAMPLES = int(os.environ.get("LOOPSTACK_FUZZ_EXAMPLES", "500"))
OPERATIONS = [(route.path, method) for router in ROUTERS for route in router.routes
              for method in sorted(route.methods) if route.include_in_schema]


@pytest.fixture(scope="module")
def fuzz_schema(manifest_path):
    # small bounds keep each case cheap: the fuzz is about what the server answers, not how fast
    app = create_app(make_settings(manifest_path, max_steps=6, max_images_per_request=2, max_new_tokens=8,
                                   default_max_tokens=4, max_image_side=32, image_timeout_seconds=20,
                                   chat_timeout_seconds=20, watch=False, admin_token=ADMIN_TOKEN),
                     load_in_background=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # the admin routes too

    def flatmap_body(context, body):
        """Each body as generated, or made servable: a served model with a condition it takes, a
        route over the served domains, counts within the bounds (the rest of the fields as drawn)."""
        if not isinstance(body, dict):
            return st.just(body)
        path = context.operation.path
        servable = st.builds(lambda model, label, route: servable_body(path, body, model, label, route),
                             st.sampled_from(list(IMAGE_MODELS)), st.integers(0, 9),
                             st.dictionaries(st.sampled_from(["math", "chat"]), st.floats(0, 1), max_size=2))
        return st.one_of(st.just(body), servable)

    servable_hooks = HookDispatcher(scope=HookScope.TEST)  # positive cases only
    servable_hooks.register_hook_with_name(flatmap_body, "flatmap_body")
    return schema, servable_hooks


# their success writes the built manifest this module's app shares with others: the fuzz checks their
# refusals, tests/test_adapter_serving.py their loads and unloads
ADAPTER_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
IMAGE_MODELS = {"tiny-dit": 10, "tiny-dit-latent": 3, "tiny-pixart": 0}  # name: classes (0: text-conditional)
IMAGE_PATHS = ("/generate-image", "/v1/images/generations")
UNSUPPORTED_COMPLETION_FIELDS = ("n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                                 "top_logprobs", "tools", "tool_choice", "store", "stream_options")


@schemathesis.check
def not_a_server_error_but_a_clients_deadline(ctx, response, case):
    """Every 5xx fails, except the documented 504 for a request whose own `timeout` passed while it
    ran (a deadline shorter than the model's speed measures yet, or one a step overran)."""
    if (response.status_code == 504 and isinstance(case.body, dict) and case.body.get("timeout") is not None
            and response.json()["error"]["type"] == "timeout"):
        return True
    return not_a_server_error(ctx, response, case)


def servable_body(path: str, body: dict, model: str, label: int, route: dict) -> dict:
    body = dict(body)
    for key, top in (("steps", 6), ("n", 2), ("max_tokens", 8), ("max_completion_tokens", 8)):
        if isinstance(body.get(key), int):
            body[key] = 1 + body[key] % top
    if path not in IMAGE_PATHS:
        if body.get("messages"):  # one user message, its text as drawn where it is not blank
            content = body["messages"][0].get("content")
            body["messages"] = [{"role": "user", "content": content if isinstance(content, str)
                                 and content.strip() else "What is 2 + 3?"}]
        if path == "/v1/chat/completions":
            body["model"] = ["tiny-lm", "tiny-lm:auto", "tiny-lm:none", "tiny-lm+math"][label % 4]
            for key in UNSUPPORTED_COMPLETION_FIELDS:  # refused by design (422): tested elsewhere
                body.pop(key, None)
        if "route" in body:
            body["route"] = route
        return body
    body["model"] = model
    for key in ("width", "height", "size"):
        body.pop(key, None)
    classes = IMAGE_MODELS[model]
    if classes == 0:
        body.pop("class_label", None)
        if not (isinstance(body.get("prompt"), str) and body["prompt"].strip()):
            body["prompt"] = "a handwritten seven"
    else:
        body["class_label"] = label % classes
        if path == "/generate-image":
            body.pop("prompt", None)
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_5xx_or_an_undocumented_answer(fuzz_schema, mode):
    """Positive: requests the schema allows (served or refused by the server's own rules).
    Negative: requests that break the schema, which must all be refused with a documented 4xx."""
    # every operation in one test: schemathesis's pytest plugin ends the app's lifespan (its
    # engines) after each test
    schema, servable_hooks = fuzz_schema
    positive = mode == GenerationMode.POSITIVE
    for path, method in OPERATIONS if positive else [(p, m) for p, m in OPERATIONS if m == "POST" and "admin" not in p]:
        statuses: dict[int, int] = {}

        @given(case=schema[path][method].as_strategy(mode, hooks=servable_hooks if positive else None))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call_and_validate(checks=[not_a_server_error_but_a_clients_deadline,
                                                      status_code_conformance, content_type_conformance,
                                                      response_schema_conformance])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        fuzz()
        print(f"{mode.value} {method} {path}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
        if positive and method == "POST" and path not in ADAPTER_ROUTES:  # the generators reach the models
            assert statuses.get(200, 0) > 0, (path, statuses)
        if not positive:
            assert all(400 <= status < 500 for status in statuses), (path, statuses)
