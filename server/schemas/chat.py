"""Bodies of POST /chat: the request, its streamed tokens, and the answer with its routing trace."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.schemas.common import MAX_SEED, StrictRequest, Text


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(min_length=1)


class JsonSchemaFormat(StrictRequest):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=1000)
    schema_: dict = Field(alias="schema", description="A JSON schema; what cannot be enforced is a 422 naming it.")
    strict: bool | None = Field(None, description="Accepted: the schema is enforced either way.")


class ResponseFormat(StrictRequest):
    type: Literal["text", "json_object", "json_schema"] = Field(description=(
        "json_object: the answer is a JSON object; json_schema: a JSON document of json_schema.schema. Enforced "
        "token by token; an answer cut by max_tokens says finish_reason \"length\" and the trace's format "
        "says it is not complete."))
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type \"json_schema\", and only then")
        return self


class ChatRequest(StrictRequest):
    # the schema says what _one_input checks: exactly one of messages and prompt (null counts as absent)
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
    ]})
    model: str | None = Field(None, max_length=64, description="The chat model; default: the served one.")
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: Text | None = Field(None, min_length=1, description="Shorthand for one user message.")
    max_tokens: int | None = Field(
        None, ge=1, description="Default: the server's default, cut to what the context leaves after the prompt."
    )
    stop: Text | list[Text] | None = Field(
        None, description="Up to 4 sequences; the answer ends before the first one it produces."
    )
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    route: Literal["auto", "none"] | dict[str, float] = Field(
        "auto", description='"auto" lets the router choose, "none" is the base alone, or {name: weight} over '
                            'the domains and PEFT adapters GET /v1/models lists.'
    )
    response_format: ResponseFormat | None = Field(None, description="Structured output, as OpenAI's.")
    stream: bool = Field(False, description="Server-sent events: `token` events with text as it is decoded, "
                                            "then one `done` event with the whole response (or an `error` event).")

    @model_validator(mode="after")
    def _one_input(self) -> "ChatRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(0 < len(s) <= 64 for s in stops)):
            raise ValueError("at most 4 stop sequences of 1 to 64 characters")
        return stops

    def as_messages(self) -> list[dict[str, str]]:
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}]
        return [m.model_dump() for m in self.messages]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FormatTrace(BaseModel):
    type: Literal["json_object", "json_schema"]
    name: str | None = Field(description="The schema's name (json_schema).")
    complete: bool = Field(description="The answer is a whole document of the format: false when max_tokens "
                                       "or a stop sequence cut it.")


class RouteTrace(BaseModel):
    route_requested: str | dict[str, float]
    domains_applied: dict[str, float] = Field(description="Domain or adapter -> the weight applied to it.")
    gated_off: dict[str, str] = Field(description="Domain or adapter -> why it was not applied.")
    router_probabilities: dict[str, float] | None = Field(description="The router's output, when it ran.")
    reason: str
    queue_seconds: float
    time_to_first_token_seconds: float | None
    generation_seconds: float
    generation: int = Field(description="The model-set generation (base, stacks, router) that served it.")
    response_format: FormatTrace | None = Field(None, description="The structured-output format the answer was "
                                                                  "held to, if any.")


class ChatToken(BaseModel):
    text: str = Field(description="The next piece of the answer; the pieces add up to the final text.")


class ChatResponse(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    seed: int
    placeholder: bool
    usage: Usage
    trace: RouteTrace
