"""GET /v1/models: every model of the manifest, whether it serves, and the details a client needs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server import status
from server.api.dependencies import Services, operator, services
from server.api.lookup import alias_route, route_aliases
from server.chat.model import ChatModel
from server.imaging.backbones import ImageBackbone
from server.schemas.common import ModelCard, ModelList

router = APIRouter(tags=["models"])


PUBLIC_BUILD = ("state", "current", "steps", "started", "finished")  # the build's state without its process


@router.get("/v1/models", response_model=ModelList)
async def list_models(svc: Services = Depends(services), details_for_operator: bool = Depends(operator)) -> ModelList:
    """Every model and its state; why an entry was refused and the zoo build's process only for the
    operator (`operator`: the admin token, or a server with no access control at all)."""
    models = svc.registry.current
    cards = []
    for model in status.models(svc.registry):
        details = {}
        if model.kind == "image" and models is not None and model.key in models.images:
            details = image_details(models.images[model.key])
        elif model.kind == "chat" and models is not None and models.chat is not None:
            details = chat_details(models.chat)
        errors = model.errors if details_for_operator else [{"entry": e["entry"]} for e in model.errors]
        card = ModelCard(id=model.key, created=int(model.loaded_at or 0), kind=model.model_kind,
                         placeholder=model.placeholder, status=model.state, generation=model.generation,
                         errors=errors, details=details)
        cards.append(card)
        if model.kind == "chat" and models is not None and models.chat is not None:
            card.domains = list(models.chat.domains)
            card.adapters = list(models.chat.adapters)
            cards += [card.model_copy(update={"id": alias, "route": alias_route(alias, models.chat)})
                      for alias in route_aliases(models.chat)]
    build = status.build_state(svc.settings)
    if build is not None and not details_for_operator:
        build = {key: value for key, value in build.items() if key in PUBLIC_BUILD}
    return ModelList(data=cards, build=build)


def image_details(b: ImageBackbone) -> dict:
    ilf = None if b.ilf is None else {"steps": b.ilf.config.steps, "scheduler": b.ilf.config.scheduler,
                                      "blocks_per_step": b.ilf.config.blocks_per_step}
    return {"native_size": b.native_size, "stride": b.stride, "blocks": b.num_blocks, "latent": b.vae is not None,
            "classes": b.class_names() if b.spec.kind == "dit" else None, "default_steps": b.spec.default_steps,
            "default_guidance_scale": b.spec.default_guidance_scale, "ilf": ilf}


def chat_details(chat: ChatModel) -> dict:
    return {"quantization": chat.precision, "device": chat.device, "context_length": chat.context_length,
            "domains": list(chat.domains),
            "stacks": {d: s.count for d, s in chat.stacks.items()}, "router": chat.router is not None,
            "adapters": {name: a.describe() for name, a in chat.adapters.items()}}
