"""GET /v1/models: every model of the manifest, whether it serves, and the details a client needs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server import status
from server.api.dependencies import Services, services
from server.api.lookup import alias_route, route_aliases
from server.chat.model import ChatModel
from server.imaging.backbones import ImageBackbone
from server.schemas.common import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(svc: Services = Depends(services)) -> ModelList:
    models = svc.registry.current
    cards = []
    for model in status.models(svc.registry):
        details = {}
        if model.kind == "image" and models is not None and model.key in models.images:
            details = image_details(models.images[model.key])
        elif model.kind == "chat" and models is not None and models.chat is not None:
            details = chat_details(models.chat)
        card = ModelCard(id=model.key, created=int(model.loaded_at or 0), kind=model.model_kind,
                         placeholder=model.placeholder, status=model.state, generation=model.generation,
                         errors=model.errors, details=details)
        cards.append(card)
        if model.kind == "chat" and models is not None and models.chat is not None:
            card.domains = list(models.chat.domains)
            cards += [card.model_copy(update={"id": alias, "route": alias_route(alias, models.chat)})
                      for alias in route_aliases(models.chat)]
    return ModelList(data=cards, build=status.build_state(svc.settings))


def image_details(b: ImageBackbone) -> dict:
    ilf = None if b.ilf is None else {"steps": b.ilf.config.steps, "scheduler": b.ilf.config.scheduler,
                                      "blocks_per_step": b.ilf.config.blocks_per_step}
    return {"native_size": b.native_size, "stride": b.stride, "blocks": b.num_blocks, "latent": b.vae is not None,
            "classes": b.class_names() if b.spec.kind == "dit" else None, "default_steps": b.spec.default_steps,
            "default_guidance_scale": b.spec.default_guidance_scale, "ilf": ilf}


def chat_details(chat: ChatModel) -> dict:
    return {"quantization": chat.precision, "device": chat.device, "context_length": chat.context_length,
            "domains": list(chat.domains),
            "stacks": {d: s.count for d, s in chat.stacks.items()}, "router": chat.router is not None}
