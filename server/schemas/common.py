"""What every area's bodies share: the error shape, strict request bodies, text a model reads, and
the model list (GET /v1/models).

Static bounds live in the bodies; bounds an operator can tune (max steps, max images, ...) come
from Settings and are checked by the serving modules, with the same error shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


def _encodable(text: str) -> str:
    # JSON can carry a lone surrogate ("\\ud800") that no tokenizer can encode: refuse it here, as a 422
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # every text field a model reads


class StrictRequest(BaseModel):
    # strict: "10" is not a number of steps, true is not a seed; unknown fields are typos, refused.
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time its serving version was loaded (0: not loaded yet).")
    owned_by: str = "loopstack"
    kind: Literal["dit", "pixart", "causal-lm"]
    route: str | dict[str, float] | None = Field(
        None, description="A chat route alias: the route this id asks for (POST /v1/chat/completions).")
    domains: list[str] | None = Field(None, description="A chat model's Brainstacks domains.")
    adapters: list[str] | None = Field(None, description="A chat model's PEFT LoRA adapters (route names like domains).")
    placeholder: bool
    status: Literal["ready", "placeholder", "loading", "failed"]
    generation: int | None = Field(description="The model-set generation its serving version was loaded in.")
    errors: list[dict] = Field(default_factory=list, description=(
        "Entries of this model that were refused; why (`reason`) for the operator only."))
    details: dict


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    build: dict | None = Field(None, description="The background zoo build, while one runs or after it ran.")
