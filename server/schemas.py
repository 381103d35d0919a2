"""Request, response and error bodies: the whole HTTP contract in one place.

Static bounds live here; bounds an operator can tune (max steps, max images, ...) come from
Settings and are checked in the routes with the same error shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1


def _encodable(text: str) -> str:
    # JSON can carry a lone surrogate ("\\ud800") that no tokenizer can encode: refuse it here, as a 422
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # every text field a model reads


class _Request(BaseModel):
    # strict: "10" is not a number of steps, true is not a seed; unknown fields are typos, refused.
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ImageRequest(_Request):
    model: str = Field(min_length=1, max_length=64, description="An image model from GET /v1/models.")
    prompt: Text | None = Field(None, description="Text prompt (text-to-image models).")
    class_label: int | Text | None = Field(None, description="Class id or name (class-conditional models).")
    steps: int | None = Field(None, ge=1, description="Denoising steps; default: the model's.")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance; <= 1 turns it off.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed + i. Default: random.")
    n: int = Field(1, ge=1, description="Images to generate.")
    width: int | None = Field(None, ge=1, description="Pixels; default: the model's native size.")
    height: int | None = Field(None, ge=1, description="Pixels; default: the model's native size.")
    scheduler: Literal["ddim", "dpm++"] | None = Field(
        None, description="Default: the ILF module's scheduler in ilf mode, else ddim."
    )
    mode: Literal["ilf", "baseline"] | None = Field(
        None, description="ilf needs a trained ILF artifact; default: ilf where one exists, else baseline."
    )
    first_block_cache: float | None = Field(None, ge=0, le=1, description=(
        "diffusers' FirstBlockCache on top of the sampler (either mode) at this threshold: a step whose first "
        "block changed by less than it (relative) since the last computed step reuses that step's output of the "
        "rest of the network. Faster, less faithful (docs/ilf.md has the trade-off per threshold). The cache "
        "decides per batch, so these images depend on the requests they were batched with. 0: off; default: "
        "the server's (LOOPSTACK_IMAGE_FIRST_BLOCK_CACHE, off unless set)."))
    response_format: Literal["json", "png"] = Field(
        "json", description="png (or Accept: image/png) returns the image itself; n > 1 gives a row of images."
    )
    stream: bool = Field(False, description="Server-sent events: `progress` after each denoising step, then one "
                                            "`done` event with the JSON response (or an `error` event).")
    timeout: float | None = Field(None, gt=0, description=(
        "Seconds the images may take, within the server's maximum (the default); a request whose "
        "measured cost exceeds it is refused up front (422), one that runs past it stops (504)."))


class ImageProgress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    steps: int
    mode: Literal["ilf", "baseline"]


class ImageResponse(BaseModel):
    model: str
    mode: Literal["ilf", "baseline"]
    scheduler: str
    steps: int
    block_evaluations: int = Field(description="Transformer blocks run per image (a step the cache skips "
                                               "runs one).")
    first_block_cache: float | None = Field(description="The FirstBlockCache threshold it ran with (null: off).")
    guidance_scale: float
    seeds: list[int]
    width: int
    height: int
    seconds: float
    placeholder: bool = Field(description="True when the model is an untrained stand-in.")
    generation: int = Field(description="The model-set generation that served this request.")
    images: list[str] = Field(description="Base64-encoded PNGs.")


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(min_length=1)


class ChatRequest(_Request):
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
        "auto", description='"auto" lets the router choose, "none" is the base alone, or {domain: weight}.'
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
    domains_applied: dict[str, float] = Field(description="Domain -> weight applied to its stacks.")
    gated_off: dict[str, str] = Field(description="Domain -> why it was not applied.")
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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time its serving version was loaded (0: not loaded yet).")
    owned_by: str = "loopstack"
    kind: Literal["dit", "pixart", "causal-lm"]
    route: str | dict[str, float] | None = Field(
        None, description="A chat route alias: the route this id asks for (POST /v1/chat/completions).")
    domains: list[str] | None = Field(None, description="A chat model's Brainstacks domains.")
    placeholder: bool
    status: Literal["ready", "placeholder", "loading", "failed"]
    generation: int | None = Field(description="The model-set generation its serving version was loaded in.")
    errors: list[dict] = Field(default_factory=list, description="Entries of this model that were refused, and why.")
    details: dict


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    build: dict | None = Field(None, description="The background zoo build, while one runs or after it ran.")


# ---------------------------------------------------------------- OpenAI's chat completions
class ContentPart(_Request):
    type: Literal["text"] = Field(description="Text parts only: Loopstack's chat models read text.")
    text: Text


class CompletionMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="developer is read as system.")
    content: Text | list[ContentPart]
    name: str | None = Field(None, max_length=64, description="Accepted; not shown to the model.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text"] = Field(description="Plain text only (no JSON mode or schemas).")


class ChatCompletionRequest(_Request):
    """OpenAI's chat completion request. Values Loopstack does not support are refused (422, naming
    the field), not ignored: several choices, penalties, logit biases, log probabilities, tools."""
    model: str = Field(min_length=1, max_length=200, description=(
        "The chat model, or a route alias of it from GET /v1/models: `<model>:auto` (the router), "
        "`<model>:none` (the base alone), `<model>+<domain>[+<domain>...]` (those domains at weight 1)."))
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
class ImageGenerationRequest(_Request):
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
