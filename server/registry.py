"""The loaded model set. A reload builds a complete new set, then swaps one reference: requests in
flight keep the set they started with, and a set that fails to load never replaces the old one."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from server.chat.model import ChatModel, load_chat
from server.imaging.backbones import ImageBackbone, load_image_backbone
from server.manifest import load_manifest
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ModelSet:
    images: dict[str, ImageBackbone] = field(default_factory=dict)
    chat: ChatModel | None = None


def load_model_set(manifest_path: Path, settings: Settings) -> ModelSet:
    manifest = load_manifest(manifest_path)
    resolver = settings.manifests().resolver(settings.allow_network)
    device = settings.torch_device()
    models = ModelSet()
    for spec in manifest.image:
        log.info("loading image model %s (%s) on %s", spec.name, spec.kind, device)
        models.images[spec.name] = load_image_backbone(spec, resolver, device)
    if manifest.chat is not None:
        log.info("loading chat model %s (%s) on %s", manifest.chat.base.name, manifest.chat.base.quantization, device)
        models.chat = load_chat(manifest.chat, resolver, device)
    return models


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self._current: ModelSet | None = None
        self._reload_lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def current(self) -> ModelSet | None:
        return self._current

    def load(self, manifest_path: Path | None = None) -> ModelSet:
        """Load a manifest (default: the built one, or the template while nothing is built) and swap
        it in; on failure the previous set keeps serving and this raises."""
        path = Path(manifest_path or self.settings.manifests().current())
        log.info("loading manifest %s", path)
        with self._reload_lock:
            try:
                models = load_model_set(path, self.settings)
            except Exception as exc:
                self.last_error = str(exc)
                self.metrics.artifact_reloads.labels(result="refused").inc()
                raise
            self._current = models  # the swap: one reference assignment
            self.last_error = None
            self.metrics.artifact_reloads.labels(result="loaded").inc()
            return models
