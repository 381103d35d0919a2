"""What the registry holds, as the API reports it: readiness (/readyz), why a model of the manifest
does not serve (the 503s), every entry's state (/admin/status), each model's state and refusals
(/v1/models), and the background zoo build's state. Entry names and paths relative to the
artifact root only: no absolute path leaves the server."""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.registry import Entry, Registry
from server.settings import Settings


@dataclass(frozen=True)
class ModelStatus:
    """One model of the manifest: an image model with its ILF module, or the chat base with its
    domains' stacks and router."""

    key: str
    kind: str  # "image" or "chat"
    model_kind: str  # "dit", "pixart" or "causal-lm"
    placeholder: bool
    state: str  # "ready", "placeholder", "loading" or "failed"
    generation: int | None
    loaded_at: float | None
    errors: list[dict]  # its entries that were refused, and why


def models(registry: Registry) -> list[ModelStatus]:
    entries = registry.entries()
    out = []
    for model in [e for e in entries if e.kind in ("image", "chat")]:
        group = [e for e in entries if e.key == model.key or e.parent == model.key]
        out.append(ModelStatus(model.key, model.kind, "causal-lm" if model.kind == "chat" else model.spec.kind,
                               model.placeholder, model.state, model.generation, model.loaded_at,
                               [{"entry": e.key, "reason": e.error} for e in group if e.error]))
    return out


def entries(registry: Registry) -> list[dict]:
    """Every entry: state, generation, checksum, load time, last error."""
    return [{"entry": e.key, "kind": e.kind, "state": e.state, "generation": e.generation,
             "checksum": e.checksum, "loaded_at": e.loaded_at, "error": e.error}
            for e in registry.entries()]


def admin_status(registry: Registry) -> dict:
    models_now = registry.current
    return {"generation": models_now.generation if models_now else None, "manifest_error": registry.manifest_error,
            "last_reload": registry.last_reload, "requests_in_flight": registry.in_flight(),
            "entries": entries(registry), "build": build_state(registry.settings)}


def readiness(registry: Registry) -> dict:
    """Entry names by state (no paths, no hashes): what /readyz shows."""
    all_entries = registry.entries()
    models_now = registry.current
    serving = (sorted(models_now.images) + ([models_now.chat.name] if models_now.chat else [])) if models_now else []
    return {"generation": models_now.generation if models_now else None, "serving": serving,
            "placeholders": sorted(e.key for e in all_entries if e.state == "placeholder"),
            "loading": sorted(e.key for e in all_entries if _pending(registry, e)),
            "failed": sorted(e.key for e in all_entries if e.error is not None)}


def unavailable(registry: Registry, kind: str, key: str | None = None) -> str | None:
    """Why a model of the manifest (an image model by name, or the chat model) does not serve: it
    is still loading, or what refused it; None when the manifest has no such model unserved."""
    entry = next((e for e in registry.entries()
                  if e.kind == kind and (key is None or e.key == key) and (e.value is None or _pending(registry, e))),
                 None)
    if entry is None:
        return None
    if entry.error and entry.value is None:
        return f"{entry.key} could not be loaded: {entry.error}"
    return f"{entry.key} is still loading; retry shortly"


def not_serving_reason(registry: Registry) -> str:
    if registry.manifest_error is not None:
        return f"no model is serving: {registry.display(registry.manifest_error)}"
    if not registry.entries() or readiness(registry)["loading"]:
        return "models are still loading"
    return "no model could be loaded; refused: " + "; ".join(
        f"{e.key}: {e.error}" for e in registry.entries() if e.error)


def build_state(settings: Settings) -> dict | None:
    """What a background zoo build writes about itself (`build.json` in the artifact root)."""
    path = settings.manifests().root / "build.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pending(registry: Registry, entry: Entry) -> bool:
    """Not serving yet: still to load, or loaded while the rest of its group (a chat base's stacks
    and router) loads, before the swap that serves them together."""
    if entry.value is None:
        return entry.state == "loading"
    current = registry.current.generation if registry.current else 0
    return entry.generation is not None and entry.generation > current
