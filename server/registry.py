"""The loaded models, entry by entry, each entry with generations of its own.

Entries: an image model's backbone, its ILF module, the chat base, each domain's stacks and the
meta-router (server/loaders.py loads each kind). `reload()` reads the manifest (the built one, or
the template while nothing is built) and, for every entry whose spec, files or parent changed since
it loaded, loads the new version through its kind's loader, warms it on its engine's worker, then
builds a new `ModelSet` and swaps one reference, one model (an image model with its ILF module, or
the chat model with its stacks and router) at a time. Requests keep the set they started on
(`acquire` / `release`); an old set's memory goes once its last request finished. An entry that is
refused keeps its previous version serving and says why; the others load on. What the registry
holds is reported by server/status.py.
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
from typing import Callable

from server.artifacts import ArtifactError
from server.chat.adapter_residency import AdapterResidency
from server.chat.adapters import LoraAdapter
from server.chat.model import ChatModel
from server.imaging.backbones import ImageBackbone
from server.loaders import LOADERS, EntryKind, LoadContext, planned_groups
from server.manifest import Manifest, ManifestError, load_manifest
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)

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
        self.manifest_error: str | None = None
        self.last_reload: dict | None = None  # reason, time and outcome of the last pass
        self._entries: dict[str, Entry] = {}
        self._current: ModelSet | None = None
        self._generation = 0
        self._reload_lock = threading.Lock()
        self._sets_lock = threading.Lock()
        self._in_flight: dict[int, int] = defaultdict(int)
        self._retired: dict[int, ModelSet] = {}
        self.adapters = AdapterResidency(settings.max_loaded_adapters, metrics)

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
                self._retired.pop(models.generation)
        if drained:
            gc.collect()  # an old set nobody uses any more: its stacks and fused copies go now

    def in_flight(self) -> dict[int, int]:
        with self._sets_lock:
            return {g: n for g, n in self._in_flight.items() if n}

    # ---------------------------------------------------------------- what it holds
    def entries(self) -> list[Entry]:
        """Every entry of the manifest served, in load order (a copy of the list; the entries are live)."""
        return list(self._entries.values())

    def entry(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def watched_files(self) -> set[Path]:
        return {path for entry in self.entries() for path in entry.files}

    # ---------------------------------------------------------------- reloads
    def reload(self, reason: str = "reload") -> dict:
        """One pass over the manifest; returns what was loaded, refused and kept."""
        with self._reload_lock:
            path = self.settings.manifests().current()
            report = {"reason": reason, "manifest": path.name, "loaded": [], "refused": [], "unchanged": []}
            try:
                manifest = load_manifest(path)
                groups = [group for group in planned_groups(manifest) if self.settings.serves(group[0][0], group[0][1])]
                removed = self._removed(manifest, {key for group in groups for key, *_ in group})
            except ManifestError as exc:
                return self._refuse_manifest(str(exc), report)
            self.manifest_error = None
            self.metrics.artifact_refused.labels(model="manifest").set(0)
            context = LoadContext(self.settings.manifests().resolver(self.settings.allow_network),
                                  self.settings.torch_device(),
                                  tuple(spec.name for group in groups for _, kind, spec, _ in group if kind == "stacks"),
                                  self.adapters)
            for key in removed:  # gone from the manifest: no longer served
                log.info("removed %s: the manifest no longer lists it", key)
                self._forget(self._entries.pop(key).value)
                self.metrics.artifact_refused.labels(model=key).set(0)
            if removed:
                self._swap()
            for group in groups:  # every entry shows as loading (and its requests get 503) until its turn
                for key, kind, _, parent in group:
                    self._entries.setdefault(key, Entry(key, kind, parent))
            for group in groups:
                if any([self._update(key, spec, context, report) for key, _, spec, _ in group]):
                    self._swap()
            self.last_reload = {"reason": reason, "at": time.time(), "generation": self._generation,
                                "loaded": len(report["loaded"]), "refused": len(report["refused"])}
            log.info("reload (%s): %d loaded, %d refused, %d unchanged; generation %d", reason,
                     len(report["loaded"]), len(report["refused"]), len(report["unchanged"]), self._generation)
            return report | {"generation": self._generation}

    def _removed(self, manifest: Manifest, planned: set[str]) -> set[str]:
        """The entries this manifest drops. A served one may go only when the manifest names it (or
        the model it attaches to) under `removed`: otherwise the manifest was cut short (a copy or an
        edit half done), and it is refused whole."""
        gone = set(self._entries) - planned
        unexplained = sorted(key for key in gone if self._entries[key].value is not None
                             and key not in manifest.removed and self._entries[key].parent not in manifest.removed)
        if unexplained:
            raise ManifestError(f"{self.settings.manifests().current().name} leaves out {', '.join(unexplained)}, "
                                f"which serve, without naming them under `removed`: a manifest cut short? "
                                f"(to remove them on purpose, list them under `removed`)")
        return gone

    def _refuse_manifest(self, reason: str, report: dict) -> dict:
        self.manifest_error = reason
        self.metrics.artifact_reloads.labels(model="manifest", result="refused").inc()
        self.metrics.artifact_refused.labels(model="manifest").set(1)
        log.error("refused the manifest: %s; every model keeps what it had", self.display(reason))
        report["refused"].append({"entry": "manifest", "reason": self.display(reason)})
        return report

    def _update(self, key: str, spec, context: LoadContext, report: dict) -> bool:
        """Load this entry anew if it changed; True when a new version was loaded."""
        entry = self._entries[key]
        entry.spec = spec
        parent = self._entries.get(entry.parent) if entry.parent else None
        parent_generation = parent.generation if parent else None
        digest = _digest(spec, parent_generation)
        if entry.value is not None and entry.digest == digest and _unchanged(entry.files):
            if entry.error is not None:  # refused since, and the manifest is back to what serves
                log.info("%s: the manifest is back to the version that serves; its refusal is over", key)
                entry.error = None
                self.metrics.artifact_refused.labels(model=key).set(0)
            report["unchanged"].append(key)
            return False
        started = time.perf_counter()
        loader = LOADERS[entry.kind]
        try:
            if entry.parent and (parent is None or parent.value is None):
                raise ArtifactError(key, f"{entry.parent} is not loaded, so nothing can attach to it")
            files = loader.files(spec, context.resolver)
            before = _stats(files)
            parent_value = parent.value if parent else None
            value = loader.load(spec, parent_value, context)
            if _stats(files) != before:
                raise ArtifactError(key, "a file changed while it was loading; the next reload reads it again")
            self._run(loader.engine, loader.warm(value, parent_value))
        except Exception as exc:  # a refused artifact must never take the server down
            entry.error = self.display(str(exc))
            entry.attempted = True
            self.metrics.artifact_reloads.labels(model=key, result="refused").inc()
            self.metrics.artifact_refused.labels(model=key).set(1)
            log.error("refused %s: %s (%s)", key, entry.error,
                      "the previous version keeps serving" if entry.value is not None else "not served")
            report["refused"].append({"entry": key, "reason": entry.error})
            return False
        self._forget(entry.value)
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

    def _forget(self, value) -> None:
        """An adapter version that serves no more counts no longer against the cap (requests still
        running on it read its weights back if they need them)."""
        if isinstance(value, LoraAdapter):
            self.adapters.forget(value)

    def _run(self, engine: str, fn: Callable) -> None:
        worker = self.workers.get(engine)
        worker(fn) if worker else fn()

    def display(self, message: str) -> str:
        """Messages name files relative to the artifact root: no absolute paths leave the server."""
        return message.replace(str(self.settings.manifests().root) + "/", "")

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
            del old
            gc.collect()

    def _images(self) -> dict[str, ImageBackbone]:
        images = {}
        for entry in self._entries.values():
            if entry.kind != "image" or entry.value is None:
                continue
            ilf = self._entries.get(f"{entry.key}/ilf")
            attached = ilf is not None and ilf.value is not None and ilf.parent_generation == entry.generation
            images[entry.key] = replace(entry.value, ilf=ilf.value if attached else None)
        return images

    def _chat(self) -> ChatModel | None:
        base = next((e for e in self._entries.values() if e.kind == "chat" and e.value is not None), None)
        if base is None:
            return None
        current = [e for e in self._entries.values()
                   if e.parent == base.key and e.value is not None and e.parent_generation == base.generation]
        router = next((e.value for e in current if e.kind == "router"), None)
        stacks = {e.spec.name: e.value for e in current if e.kind == "stacks"}
        adapters = {e.spec.name: e.value for e in current if e.kind == "adapter"}
        domains = tuple(e.spec.name for e in self._entries.values() if e.kind == "stacks")
        return replace(base.value, domains=domains, stacks=stacks, router=router, adapters=adapters)


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
    sums = [v for v in _leaves(spec.model_dump(mode="json")) if isinstance(v, str) and len(v) == 64]
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
