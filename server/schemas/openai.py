"""OpenAI's bodies, as Loopstack accepts and answers them: chat completions (plain and streamed
chunks) and image generations, with what Loopstack ran in `loopstack`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.schemas.chat import ResponseFormat, RouteTrace, Usage
from server.schemas.common import MAX_SEED, StrictRequest, Text


# ---------------------------------------------------------------- OpenAI's chat completions
class ContentPart(StrictRequest):
    type: Literal["text"] = Field(description="Text parts only: Loopstack's chat models read text.")
    text: Text


class CompletionMessage(StrictRequest):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is read as system.")
    content: Text | list[ContentPart]
    name: str | None = Field(None, max_length=64, description="Accepted; not shown to the model.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(StrictRequest):
    include_usage: bool = False


class ChatCompletionRequest(StrictRequest):
    """OpenAI's chat completion request. Values Loopstack does not support are refused (422, naming
    the field), not ignored: several choices, penalties, logit biases, log probabilities, tools."""
    model: str = Field(min_length=1, max_length=200, description=(
        "The chat model, or a route alias of it from GET /v1/models: `<model>:auto` (the router), "
        "`<model>:none` (the base alone), `<model>+<domain or adapter>[+...]` (those at weight 1)."))
    messages: list[CompletionMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Wins over max_tokens when both are given.")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1, as OpenAI's; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = Field(None, max_length=256, description="Accepted; not used.")
    metadata: dict[str, str] | None = Field(None, description="Accepted; not stored.")
    store: bool | None = None
    route: Literal["auto", "none"] | dict[str, float] | None = Field(
        None, description='Loopstack: "auto", "none" or {domain: weight} (default: the model alias\'s, else auto).')

    def unsupported(self) -> tuple[str, str] | None:
        """The first field whose value Loopstack does not support: (field, why)."""
        checks = [
            ("n", self.n not in (None, 1), "one choice per request"),
            ("presence_penalty", self.presence_penalty not in (None, 0), "no penalties"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "no penalties"),
            ("logit_bias", bool(self.logit_bias), "no logit biases"),
            ("logprobs", bool(self.logprobs), "no log probabilities"),
            ("top_logprobs", bool(self.top_logprobs), "no log probabilities"),
            ("tools", bool(self.tools), "no tool calls"),
            ("tool_choice", self.tool_choice not in (None, "none", "auto") or
             (self.tool_choice == "auto" and bool(self.tools)), "no tool calls"),
            ("store", bool(self.store), "completions are not stored"),
            ("stream_options", self.stream_options is not None and not self.stream,
             "stream_options needs stream: true"),
        ]
        return next(((field, why) for field, bad, why in checks if bad), None)


class CompletionAnswer(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    message: CompletionAnswer
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class LoopstackExtra(BaseModel):
    seed: int
    placeholder: bool
    trace: RouteTrace


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="The model-set generation that served it.")
    loopstack: LoopstackExtra = Field(description="Loopstack's routing trace, the seed and whether the model is a placeholder.")


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
    loopstack: LoopstackExtra | None = Field(None, description="On the chunk that carries the finish reason.")


# ---------------------------------------------------------------- OpenAI's image generations
class ImageGenerationRequest(StrictRequest):
    """OpenAI's image generation request; Loopstack's sampling settings travel in the extra body."""
    model: str = Field(min_length=1, max_length=64, description="An image model from GET /v1/models.")
    prompt: Text = Field(min_length=1, description=(
        "Text-to-image models: the prompt. Class-conditional models: a class name (or send class_label)."))
    n: int | None = Field(None, ge=1)
    size: str | None = Field(None, max_length=16, description='"WIDTHxHEIGHT" or "auto" (the model\'s native size).')
    response_format: Literal["b64_json", "url"] | None = Field(None, description="b64_json only: no image hosting.")
    output_format: Literal["png"] | None = None
    quality: Literal["auto", "standard"] | None = None
    style: None = None
    background: Literal["auto"] | None = None
    moderation: Literal["auto", "low"] | None = None
    user: str | None = Field(None, max_length=256, description="Accepted; not used.")
    steps: int | None = Field(None, ge=1)
    mode: Literal["ilf", "baseline"] | None = None
    first_block_cache: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    class_label: int | Text | None = None
    guidance_scale: float | None = Field(None, ge=0)
    scheduler: Literal["ddim", "dpm++"] | None = None


class GeneratedImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[GeneratedImage]
    output_format: Literal["png"] = "png"
    size: str
    loopstack: dict = Field(description="What ran: mode, steps, block evaluations, seeds, seconds, generation.")
