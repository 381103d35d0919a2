"""Bodies of POST /chat: the request, its streamed tokens, and the answer with its routing trace."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.schemas.common import MAX_SEED, StrictRequest, Text


class ChatMessage(StrictRequest):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(min_length=1)


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
