"""How each kind of manifest entry is listed, loaded and warmed: one loader per kind, in a table.

A manifest makes entries (`planned_groups`): an image model's backbone and its ILF module, the chat
base, each domain's stacks, each PEFT adapter and the meta-router, grouped by the model they make up. The registry
(server/registry.py) loads any of them the same way: the files it reads (checked for changes while
it loads, and watched afterwards), `load` (verified: checksums, safetensors only, shapes and base
model), and `warm`, one small call through the new artifact on the engine that will run it, so that
a file that loads but does not run is refused there, not in a client's request. A new kind of entry
is a loader here and its line in `planned_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal, Protocol

from server.chat.adapter_residency import AdapterResidency
from server.chat.adapters import WEIGHTS_FILE, LoraAdapter, load_adapter
from server.chat.decoding import ChatJob, generate
from server.chat.model import ChatModel, load_chat_base
from server.chat.router import load_router_for
from server.chat.stacks import DomainStacks, load_domain_stacks
from server.imaging.backbones import ImageBackbone, load_ilf_for, load_image_backbone
from server.imaging.sampler import SampleJob, sample
from server.manifest import ArtifactResolver, Manifest, Source, adapter_key, ilf_key, router_key, stacks_key

EntryKind = Literal["image", "ilf", "chat", "stacks", "router", "adapter"]
PlannedEntry = tuple[str, EntryKind, object, str | None]  # key, kind, its manifest spec, the entry it attaches to

HELLO = ChatJob([{"role": "user", "content": "Hello"}], 1, 0.0, 1.0, 0)  # a chat warm-up: one greedy token


@dataclass(frozen=True)
class LoadContext:
    resolver: ArtifactResolver
    device: str
    domains: tuple[str, ...]  # the chat domains of the manifest, in order
    adapters: AdapterResidency | None = None  # keeps PEFT adapters' weights in memory within the cap


class Loader(Protocol):
    engine: str  # the engine whose worker runs what this kind loads ("image" or "chat")

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        """Every file a load of `spec` reads."""

    def load(self, spec, parent, context: LoadContext) -> object:
        """The loaded, verified artifact (`parent`: the loaded entry it attaches to, if any)."""

    def warm(self, value, parent) -> Callable[[], object]:
        """One small call through `value` (as it will serve, on `parent`), run on the engine's worker."""


def source_files(source: Source, resolver: ArtifactResolver) -> list[Path]:
    if source.path is None:
        return []  # a hub snapshot: its pinned revision fixes it
    folder = resolver.resolve(source.path)
    return [folder / rel for rel in source.files]


def _image_warm_up(backbone: ImageBackbone, mode: str) -> Callable[[], object]:
    condition = 0 if backbone.spec.kind == "dit" else "warm-up"
    size = backbone.native_size
    return lambda: sample(backbone, SampleJob([condition], [0], 1, 1.0, size, size, mode=mode))


class ImageBackboneLoader:
    engine = "image"

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        sources = [spec.source] + ([spec.text_encoder.source] if spec.text_encoder is not None else [])
        return [path for source in sources for path in source_files(source, resolver)]

    def load(self, spec, parent, context: LoadContext) -> ImageBackbone:
        return load_image_backbone(spec, context.resolver, context.device)

    def warm(self, value: ImageBackbone, parent) -> Callable[[], object]:
        return _image_warm_up(value, "baseline")


class ILFLoader:
    engine = "image"

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        return [resolver.resolve(spec.path)]

    def load(self, spec, parent: ImageBackbone, context: LoadContext):
        return load_ilf_for(parent, spec, context.resolver)

    def warm(self, value, parent: ImageBackbone) -> Callable[[], object]:
        return _image_warm_up(replace(parent, ilf=value), "ilf")


class ChatBaseLoader:
    engine = "chat"

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        return source_files(spec.source, resolver)

    def load(self, spec, parent, context: LoadContext) -> ChatModel:
        return load_chat_base(spec, context.resolver, context.device)

    def warm(self, value: ChatModel, parent) -> Callable[[], object]:
        return lambda: generate(value, HELLO)


class DomainStacksLoader:
    engine = "chat"

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        return [resolver.resolve(a.path) for a in spec.stacks]

    def load(self, spec, parent: ChatModel, context: LoadContext) -> DomainStacks:
        paths = [context.resolver.artifact(a) for a in spec.stacks]
        return load_domain_stacks(parent.model, spec.name, paths, parent.name)

    def warm(self, value: DomainStacks, parent: ChatModel) -> Callable[[], object]:
        chat = replace(parent, domains=(value.domain,), stacks={value.domain: value})
        return lambda: generate(chat, HELLO, {value.domain: 1.0})


class RouterLoader:
    engine = "chat"

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        return [resolver.resolve(spec.path)]

    def load(self, spec, parent: ChatModel, context: LoadContext):
        router = load_router_for(context.resolver.artifact(spec), parent.model.config, context.domains, parent.name)
        return router.to(context.device)

    def warm(self, value, parent: ChatModel) -> Callable[[], object]:
        chat = replace(parent, router=value, domains=value.config.domains)
        return lambda: chat.router_probabilities(HELLO.messages)


class AdapterLoader:
    engine = "chat"

    def files(self, spec, resolver: ArtifactResolver) -> list[Path]:
        return source_files(spec.source, resolver)

    def load(self, spec, parent: ChatModel, context: LoadContext) -> LoraAdapter:
        folder = context.resolver.source(spec.source)
        if context.adapters is not None:
            context.adapters.make_room(1)  # before its weights are read, not after
        adapter = load_adapter(folder, spec.name, parent.model, parent.name, spec.source.path,
                               spec.source.files.get(WEIGHTS_FILE))
        if context.adapters is not None:
            context.adapters.admit(adapter)
        return adapter

    def warm(self, value: LoraAdapter, parent: ChatModel) -> Callable[[], object]:
        chat = replace(parent, domains=(), stacks={}, adapters={value.name: value})
        return lambda: generate(chat, HELLO, {value.name: 1.0})


LOADERS: dict[EntryKind, Loader] = {
    "image": ImageBackboneLoader(), "ilf": ILFLoader(), "chat": ChatBaseLoader(),
    "stacks": DomainStacksLoader(), "router": RouterLoader(), "adapter": AdapterLoader(),
}


def planned_groups(manifest: Manifest) -> list[list[PlannedEntry]]:
    """The manifest's entries, grouped by the model they make up, in load order (images first)."""
    groups = []
    for model in manifest.image:
        group: list[PlannedEntry] = [(model.name, "image", model.model_copy(update={"ilf": None}), None)]
        if model.ilf is not None:
            group.append((ilf_key(model.name), "ilf", model.ilf, model.name))
        groups.append(group)
    if manifest.chat is not None:
        base = manifest.chat.base.name
        group = [(base, "chat", manifest.chat.base, None)]
        group += [(stacks_key(base, d.name), "stacks", d, base) for d in manifest.chat.domains]
        group += [(adapter_key(base, a.name), "adapter", a, base) for a in manifest.chat.adapters]
        if manifest.chat.router is not None:
            group.append((router_key(base), "router", manifest.chat.router, base))
        groups.append(group)
    return groups
