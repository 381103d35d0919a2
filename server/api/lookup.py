"""Which served model a request names, for native and OpenAI routes alike: the chat model and its
route aliases (`<model>:auto`, `<model>:none`, `<model>+math+medical`), and image models by name.
One error per case: 404 `model_not_found` for a name the server does not serve, 503 `not_ready`
(with the reason) for a model of the manifest that is still loading or was refused."""

from __future__ import annotations

from server import status
from server.chat.model import ChatModel
from server.chat.router import Route
from server.errors import ApiError
from server.imaging.backbones import ImageBackbone
from server.registry import ModelSet, Registry

NOT_FOUND = "model_not_found"


def served_chat(models: ModelSet, registry: Registry, name: str | None = None) -> ChatModel:
    """The chat model of the request's model set; `name`, when the request gives one, must be its name."""
    if models.chat is None:
        if reason := status.unavailable(registry, "chat"):
            raise ApiError(503, reason, "model")
        raise ApiError(404, "this server's manifest has no chat model", "model", NOT_FOUND)
    if name is not None and name != models.chat.name:
        raise ApiError(404, f"unknown chat model {name!r}; this server serves {models.chat.name!r}", "model", NOT_FOUND)
    return models.chat


def served_image(name: str, models: ModelSet, registry: Registry) -> ImageBackbone:
    backbone = models.images.get(name)
    if backbone is None:
        if reason := status.unavailable(registry, "image", name):
            raise ApiError(503, reason, "model")
        raise ApiError(404, f"unknown image model {name!r}; serving: {sorted(models.images)}", "model", NOT_FOUND)
    return backbone


def route_aliases(chat: ChatModel) -> list[str]:
    """The model ids GET /v1/models lists for a chat model: the router's and the base alone's, and
    each domain and adapter on its own (any +-joined set of them is accepted too)."""
    return [f"{chat.name}:auto", f"{chat.name}:none"] + [f"{chat.name}+{d}" for d in chat.route_names]


def alias_route(model: str, chat: ChatModel) -> Route | None:
    """The route a model id names (None: the plain model, no route of its own)."""
    if model == chat.name:
        return None
    if model in (f"{chat.name}:auto", f"{chat.name}:none"):
        return model.rsplit(":", 1)[1]
    if model.startswith(f"{chat.name}+"):
        domains = model[len(chat.name) + 1:].split("+")
        if unknown := [d for d in domains if d not in chat.route_names]:
            raise ApiError(404, f"model {model!r}: {chat.name!r} has no domain or adapter {unknown[0]!r}; "
                                f"served domains: {list(chat.domains)}, adapters: {list(chat.adapters)}",
                           "model", NOT_FOUND)
        return {d: 1.0 for d in domains}
    raise ApiError(404, f"unknown model {model!r}; this server's chat model is {chat.name!r} "
                        f"(route aliases: GET /v1/models)", "model", NOT_FOUND)
