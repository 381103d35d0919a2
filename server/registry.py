"""The loaded models, entry by entry, each entry with generations of its own.

Entries: an image model's backbone, its ILF module, the chat base, each domain's stacks and the
meta-router. `reload()` reads the manifest (the built one, or the template while nothing is built)
and, for every entry whose spec, files or parent changed since it loaded, verifies and loads the new
version (checksums, safetensors only, shapes and base model checked by the loaders), warms it on its
engine's worker, then builds a new `ModelSet` and swaps one reference, one model (an image model
with its ILF module, or the chat model with its stacks and router) at a time. Requests keep the set
they started on (`acquire` / `release`); an old set's memory goes once its last request finished.
An entry that is refused keeps its previous version serving and says why; the others load on.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from server.artifacts import ArtifactError
from server.chat.model import ChatJob, ChatModel, load_chat_base
from server.chat.router import load_router_for
from server.chat.stacks import forget_fused, load_domain_stacks
from server.imaging.backbones import ImageBackbone, load_ilf_for, load_image_backbone
from server.imaging.sampler import SampleJob, sample
from server.manifest import ArtifactResolver, Manifest, ManifestError, Source, load_manifest
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

EntryKind = Literal["image", "ilf", "chat", "stacks", "router"]
Worker = Callable[[Callable], object]  # runs a function on an engine's worker thread


@dataclass
class Entry:
    key: str  # "digits-dit", "digits-dit/ilf", "zoo-lm", "zoo-lm/stacks/math", "zoo-lm/router"
    kind: EntryKind
    parent: str | None  # the entry this one attaches to (ILF -> its image model; stacks, router -> the base)
    spec: object = None  # the manifest's entry it was last planned from
    value: object = None  # what serves: ImageBackbone, LoadedILF, ChatModel (the base), DomainStacks, MetaRouter
    served_spec: object = None  # the manifest's entry `value` was loaded from
    generation: int | None = None  # the model-set generation it was loaded in
    parent_generation: int | None = None
    digest: str | None = None  # of the spec and the parent it was loaded with
    checksum: str | None = None  # of its files' sha256s, as the manifest records them
    loaded_at: float | None = None
    error: str | None = None  # why the last attempt was refused (the previous version, if any, serves)
    attempted: bool = False
    files: dict[Path, tuple[int, int]] = field(default_factory=dict)  # what it loaded: (size, mtime) then

    @property
    def state(self) -> str:
        if self.value is not None:
            return "placeholder" if self.placeholder else "ready"
        return "failed" if self.attempted else "loading"

    @property
    def placeholder(self) -> bool:
        return bool(getattr(self.served_spec or self.spec, "placeholder", False))


@dataclass(frozen=True)
class ModelSet:
    """What one request runs on, from start to end."""

    generation: int
    images: dict[str, ImageBackbone] = field(default_factory=dict)
    chat: ChatModel | None = None


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics, workers: dict[str, Worker] | None = None):
        self.settings = settings
        self.metrics = metrics
        self.workers = workers or {}  # "image" / "chat" -> run on that engine's worker (default: here)
        self.entries: dict[str, Entry] = {}
        self.manifest_error: str | None = None
        self.last_reload: dict | None = None  # reason, time and outcome of the last pass
        self._current: ModelSet | None = None
        self._generation = 0
        self._reload_lock = threading.Lock()
        self._sets_lock = threading.Lock()
        self._in_flight: dict[int, int] = defaultdict(int)
        self._retired: dict[int, ModelSet] = {}

    # ---------------------------------------------------------------- requests
    @property
    def current(self) -> ModelSet | None:
        return self._current

    def acquire(self) -> ModelSet | None:
        with self._sets_lock:
            models = self._current
            if models is not None:
                self._in_flight[models.generation] += 1
            return models

    def release(self, models: ModelSet) -> None:
        with self._sets_lock:
            self._in_flight[models.generation] -= 1
            drained = self._in_flight[models.generation] == 0 and models.generation in self._retired
            if drained:
                del self._in_flight[models.generation]
                retired = self._retired.pop(models.generation)
        if drained:
            self._free(retired)

    def in_flight(self) -> dict[int, int]:
        with self._sets_lock:
            return {g: n for g, n in self._in_flight.items() if n}

    # ---------------------------------------------------------------- reloads
    def reload(self, reason: str = "reload") -> dict:
        """One pass over the manifest; returns what was loaded, refused and kept."""
        with self._reload_lock:
            path = self.settings.manifests().current()
            report = {"reason": reason, "manifest": path.name, "loaded": [], "refused": [], "unchanged": []}
            try:
                manifest = load_manifest(path)
                self.manifest_error = None
                self.metrics.artifact_refused.labels(model="manifest").set(0)
            except ManifestError as exc:
                self.manifest_error = str(exc)
                self.metrics.artifact_reloads.labels(model="manifest", result="refused").inc()
                self.metrics.artifact_refused.labels(model="manifest").set(1)
                log.error("%s; every model keeps what it had", exc)
                report["refused"].append({"entry": "manifest", "reason": str(exc)})
                return report
            resolver = self.settings.manifests().resolver(self.settings.allow_network)
            groups = [group for group in planned_groups(manifest) if self.settings.serves(group[0][0], group[0][1])]
            removed = set(self.entries) - {key for group in groups for key, *_ in group}
            for key in removed:  # gone from the manifest: no longer served
                del self.entries[key]
                self.metrics.artifact_refused.labels(model=key).set(0)
            if removed:
                self._swap()
            for group in groups:  # every entry shows as loading (and its requests get 503) until its turn
                for key, kind, _, parent in group:
                    self.entries.setdefault(key, Entry(key, kind, parent))
            for group in groups:
                if any([self._update(key, kind, spec, parent, resolver, report) for key, kind, spec, parent in group]):
                    self._swap()
            self.last_reload = {"reason": reason, "at": time.time(), "generation": self._generation,
                                "loaded": len(report["loaded"]), "refused": len(report["refused"])}
            log.info("reload (%s): %d loaded, %d refused, %d unchanged; generation %d", reason,
                     len(report["loaded"]), len(report["refused"]), len(report["unchanged"]), self._generation)
            return report | {"generation": self._generation}

    def _update(self, key: str, kind: EntryKind, spec, parent: str | None, resolver: ArtifactResolver,
                report: dict) -> bool:
        """Load this entry anew if it changed; True when a new version was loaded."""
        entry = self.entries.setdefault(key, Entry(key, kind, parent))
        entry.spec = spec
        parent_entry = self.entries.get(parent) if parent else None
        parent_generation = parent_entry.generation if parent_entry else None
        digest = _digest(spec, parent_generation)
        if entry.value is not None and entry.digest == digest and _unchanged(entry.files):
            report["unchanged"].append(key)
            return False
        started = time.perf_counter()
        try:
            if parent and (parent_entry is None or parent_entry.value is None):
                raise ArtifactError(key, f"{parent} is not loaded, so nothing can attach to it")
            files = self._files(kind, spec, resolver)
            before = _stats(files)
            value = self._load(kind, spec, parent_entry.value if parent_entry else None, resolver)
            if _stats(files) != before:
                raise ArtifactError(key, "a file changed while it was loading; the next reload reads it again")
            self._warm(kind, value, parent_entry.value if parent_entry else None)
        except Exception as exc:  # a refused artifact must never take the server down
            entry.error = self._display(str(exc))
            entry.attempted = True
            self.metrics.artifact_reloads.labels(model=key, result="refused").inc()
            self.metrics.artifact_refused.labels(model=key).set(1)
            log.error("refused %s: %s (%s)", key, entry.error,
                      "the previous version keeps serving" if entry.value is not None else "not served")
            report["refused"].append({"entry": key, "reason": entry.error})
            return False
        entry.value, entry.served_spec, entry.generation, entry.parent_generation, entry.digest = (
            value, spec, self._generation + 1, parent_generation, digest)  # it serves from the next swap on
        entry.files, entry.loaded_at, entry.error, entry.attempted = before, time.time(), None, True
        entry.checksum = _checksum(spec)
        self.metrics.artifact_reloads.labels(model=key, result="loaded").inc()
        self.metrics.artifact_generation.labels(model=key).set(entry.generation)
        self.metrics.artifact_refused.labels(model=key).set(0)
        log.info("loaded %s (generation %d) in %.2f s", key, entry.generation, time.perf_counter() - started)
        report["loaded"].append(key)
        return True

    def _load(self, kind: EntryKind, spec, parent, resolver: ArtifactResolver):
        device = self.settings.torch_device()
        if kind == "image":
            return load_image_backbone(spec, resolver, device)
        if kind == "ilf":
            return load_ilf_for(parent, spec, resolver)
        if kind == "chat":
            return load_chat_base(spec, resolver, device)
        if kind == "stacks":
            return load_domain_stacks(parent.model, spec.name, [resolver.artifact(a) for a in spec.stacks], parent.name)
        domains = tuple(d.name for d in self._chat_domains())
        return load_router_for(resolver.artifact(spec), parent.model.config, domains, parent.name).to(device)

    def _warm(self, kind: EntryKind, value, parent) -> None:
        """One small call through the new artifact, on the worker that will run it: a file that loads
        but does not run is refused here, not in a client's request."""
        if kind in ("image", "ilf"):
            backbone = value if kind == "image" else replace(parent, ilf=value)
            condition = 0 if backbone.spec.kind == "dit" else "warm-up"
            size = backbone.native_size
            job = SampleJob([condition], [0], 1, 1.0, size, size, mode="ilf" if kind == "ilf" else "baseline")
            self._run("image", lambda: sample(backbone, job))
            return
        job = ChatJob([{"role": "user", "content": "Hello"}], 1, 0.0, 1.0, 0)
        if kind == "chat":
            self._run("chat", lambda: value.generate(job))
        elif kind == "stacks":
            chat = replace(parent, domains=(value.domain,), stacks={value.domain: value})
            self._run("chat", lambda: chat.generate(job, {value.domain: 1.0}))
        else:
            chat = replace(parent, router=value, domains=value.config.domains)
            self._run("chat", lambda: chat.router_probabilities(job.messages))

    def _run(self, engine: str, fn: Callable) -> None:
        worker = self.workers.get(engine)
        worker(fn) if worker else fn()

    # ---------------------------------------------------------------- model sets
    def _swap(self) -> None:
        """Compose a new model set (the next generation) from every entry's current version; swap it in."""
        self._generation += 1
        models = ModelSet(self._generation, self._images(), self._chat())
        with self._sets_lock:
            old, self._current = self._current, models
            if old is not None and self._in_flight.get(old.generation):
                self._retired[old.generation] = old  # freed when its last request is released
                old = None
        if old is not None:
            self._free(old)

    def _images(self) -> dict[str, ImageBackbone]:
        images = {}
        for entry in self.entries.values():
            if entry.kind != "image" or entry.value is None:
                continue
            ilf = self.entries.get(f"{entry.key}/ilf")
            attached = ilf is not None and ilf.value is not None and ilf.parent_generation == entry.generation
            images[entry.key] = replace(entry.value, ilf=ilf.value if attached else None)
        return images

    def _chat(self) -> ChatModel | None:
        base = next((e for e in self.entries.values() if e.kind == "chat" and e.value is not None), None)
        if base is None:
            return None
        current = [e for e in self.entries.values()
                   if e.parent == base.key and e.value is not None and e.parent_generation == base.generation]
        router = next((e.value for e in current if e.kind == "router"), None)
        stacks = {e.spec.name: e.value for e in current if e.kind == "stacks"}
        domains = tuple(d.name for d in self._chat_domains())
        return replace(base.value, domains=domains, stacks=stacks, router=router)

    def _chat_domains(self) -> list:
        return [e.spec for e in self.entries.values() if e.kind == "stacks"]

    def _free(self, old: ModelSet) -> None:
        """An old set nobody uses any more: drop the fused stack copies the base cached for it."""
        if old.chat is not None:
            forget_fused(old.chat.model)
        gc.collect()

    # ---------------------------------------------------------------- reports
    def status(self) -> list[dict]:
        """Every entry: state, generation, checksum, load time, last error (relative paths only)."""
        return [{"entry": e.key, "kind": e.kind, "state": e.state, "generation": e.generation,
                 "checksum": e.checksum, "loaded_at": e.loaded_at, "error": e.error}
                for e in self.entries.values()]

    def readiness(self) -> dict:
        """Entry names by state (no paths, no hashes): what /readyz shows."""
        entries = list(self.entries.values())
        models = self._current
        serving = sorted(models.images) + ([models.chat.name] if models and models.chat else []) if models else []
        return {"generation": models.generation if models else None, "serving": serving,
                "placeholders": sorted(e.key for e in entries if e.state == "placeholder"),
                "loading": sorted(e.key for e in entries if self._pending(e)),
                "failed": sorted(e.key for e in entries if e.error is not None)}

    def unavailable(self, kind: EntryKind, key: str | None = None) -> str | None:
        """Why a model of the manifest (an image model by name, or the chat model) does not serve:
        it is still loading, or what refused it; None when the manifest has no such model unserved."""
        entry = next((e for e in list(self.entries.values())
                      if e.kind == kind and (key is None or e.key == key) and (e.value is None or self._pending(e))),
                     None)
        if entry is None:
            return None
        if entry.error and entry.value is None:
            return f"{entry.key} could not be loaded: {entry.error}"
        return f"{entry.key} is still loading; retry shortly"

    def _pending(self, entry: Entry) -> bool:
        """Not serving yet: still to load, or loaded while the rest of its group (a chat base's
        stacks and router) loads, before the swap that serves them together."""
        if entry.value is None:
            return entry.state == "loading"
        current = self._current.generation if self._current else 0
        return entry.generation is not None and entry.generation > current

    def not_serving_reason(self) -> str:
        if self.manifest_error is not None:
            return f"no model is serving: {self._display(self.manifest_error)}"
        ready = self.readiness()
        if not self.entries or ready["loading"]:
            return "models are still loading"
        return "no model could be loaded; refused: " + "; ".join(
            f"{e.key}: {e.error}" for e in self.entries.values() if e.error)

    def build_state(self) -> dict | None:
        """What a background zoo build writes about itself (`build.json` in the artifact root)."""
        path = self.settings.manifests().root / "build.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def watched_files(self) -> set[Path]:
        return {path for entry in self.entries.values() for path in entry.files}

    def _display(self, message: str) -> str:
        """Messages name files relative to the artifact root: no absolute paths leave the server."""
        return message.replace(str(self.settings.manifests().root) + "/", "")

    def _files(self, kind: EntryKind, spec, resolver: ArtifactResolver) -> list[Path]:
        if kind in ("image", "chat"):
            sources = [spec.source] + ([spec.text_encoder.source] if getattr(spec, "text_encoder", None) else [])
            return [path for source in sources for path in _source_files(source, resolver)]
        if kind == "stacks":
            return [resolver.resolve(a.path) for a in spec.stacks]
        return [resolver.resolve(spec.path)]


def planned_groups(manifest: Manifest) -> list[list[tuple[str, EntryKind, object, str | None]]]:
    """The manifest's entries, grouped by the model they make up, in load order (images first)."""
    groups = []
    for model in manifest.image:
        group = [(model.name, "image", model.model_copy(update={"ilf": None}), None)]
        if model.ilf is not None:
            group.append((f"{model.name}/ilf", "ilf", model.ilf, model.name))
        groups.append(group)
    if manifest.chat is not None:
        base = manifest.chat.base.name
        group = [(base, "chat", manifest.chat.base, None)]
        group += [(f"{base}/stacks/{d.name}", "stacks", d, base) for d in manifest.chat.domains]
        if manifest.chat.router is not None:
            group.append((f"{base}/router", "router", manifest.chat.router, base))
        groups.append(group)
    return groups


def _source_files(source: Source, resolver: ArtifactResolver) -> list[Path]:
    if source.path is None:
        return []  # a hub snapshot: its pinned revision fixes it
    folder = resolver.resolve(source.path)
    return [folder / rel for rel in source.files]


def _stats(files: list[Path] | dict) -> dict[Path, tuple[int, int]]:
    out = {}
    for path in files:
        try:
            stat = path.stat()
            out[path] = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            out[path] = (-1, -1)
    return out


def _unchanged(files: dict[Path, tuple[int, int]]) -> bool:
    return _stats(list(files)) == files


def _digest(spec, parent_generation: int | None) -> str:
    text = json.dumps([spec.model_dump(mode="json"), parent_generation], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum(spec) -> str | None:
    """One sha256 over the entry's recorded file checksums (what /admin/status shows)."""
    dump = spec.model_dump(mode="json")
    sums = [v for v in _leaves(dump) if isinstance(v, str) and len(v) == 64]
    return hashlib.sha256("".join(sorted(sums)).encode()).hexdigest() if sums else None


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value
