"""Bodies of POST /generate-image: the request, its streamed progress and its answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.schemas.common import MAX_SEED, StrictRequest, Text


class ImageRequest(StrictRequest):
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
    timeout: float | None = Field(None, ge=0.01, description=(
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
