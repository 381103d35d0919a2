"""GET /v1/models: what is loaded, with the details a client needs to call it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.dependencies import loaded_models
from server.chat.model import ChatModel
from server.imaging.backbones import ImageBackbone
from server.registry import ModelSet
from server.schemas import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(models: ModelSet = Depends(loaded_models)) -> ModelList:
    cards = [image_card(b) for b in models.images.values()]
    if models.chat is not None:
        cards.append(chat_card(models.chat))
    return ModelList(data=cards)


def image_card(b: ImageBackbone) -> ModelCard:
    ilf = None if b.ilf is None else {"steps": b.ilf.config.steps, "scheduler": b.ilf.config.scheduler,
                                      "blocks_per_step": b.ilf.config.blocks_per_step}
    return ModelCard(
        id=b.name, kind=b.spec.kind, placeholder=b.spec.placeholder,
        details={"native_size": b.native_size, "stride": b.stride, "blocks": b.num_blocks,
                 "latent": b.vae is not None, "classes": b.class_names() if b.spec.kind == "dit" else None,
                 "default_steps": b.spec.default_steps, "default_guidance_scale": b.spec.default_guidance_scale,
                 "ilf": ilf},
    )


def chat_card(chat: ChatModel) -> ModelCard:
    return ModelCard(
        id=chat.name, kind="causal-lm", placeholder=chat.spec.placeholder,
        details={"quantization": chat.spec.quantization, "device": chat.device,
                 "domains": list(chat.domains), "router": chat.router is not None},
    )
