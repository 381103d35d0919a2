"""Loading and unloading PEFT adapters while the server runs (vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter): a load records the adapter, with its files' sha256, in the built manifest
and reloads, so it is verified, warmed and swapped in like any artifact (requests in flight finish on
the model set they started on) and survives a restart; an adapter the reload refuses is taken out
of the manifest again and its reason returned. An unload drops it from the manifest the same way.
"""

from __future__ import annotations

import re

from server.artifacts import folder_digests
from server.errors import ApiError
from server.manifest import Adapter, Source, adapter_key
from server.registry import Registry
from server.settings import Settings

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def load_at_run_time(settings: Settings, registry: Registry, name: str, lora_path: str, in_place: bool = False) -> str:
    """Load the adapter folder `lora_path` (inside the adapter root) as `name`; `in_place` replaces
    an adapter of that name (vLLM's load_inplace), which keeps serving if the new one is refused."""
    if not NAME.match(name):
        raise ApiError(422, "lora_name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                       "lora_name")
    root, artifacts = settings.adapters_folder(), settings.artifact_root.resolve()
    if not root.is_relative_to(artifacts):
        raise ApiError(422, "the adapter root (LOOPSTACK_ADAPTER_ROOT) must lie inside the artifact root", "lora_path")
    try:
        folder = (root / lora_path).resolve()
        if not folder.is_relative_to(root):
            raise ApiError(422, "lora_path: must lie inside the adapter root (a path relative to it)", "lora_path")
        if not folder.is_dir():
            raise ApiError(422, f"lora_path: no adapter folder {lora_path!r} in the adapter root", "lora_path")
    except ValueError as exc:  # a NUL byte, a lone surrogate: no file system takes it
        raise ApiError(422, f"lora_path: not a path this system can open ({exc})", "lora_path") from exc
    manifests = settings.manifests()
    with manifests.updating() as manifest:
        if manifest.chat is None:
            raise ApiError(422, "this server has no chat model to load an adapter on", "lora_name")
        previous = next((a for a in manifest.chat.adapters if a.name == name), None)
        if name in {d.name for d in manifest.chat.domains} or (previous is not None and not in_place):
            raise ApiError(409, f"lora_name: {name!r} is already the name of a domain or adapter"
                                + (" (load_inplace replaces an adapter)" if previous is not None else ""), "lora_name")
        try:
            files = folder_digests(folder)
        except OSError as exc:
            raise ApiError(422, f"lora_path: cannot read {lora_path!r} ({exc.strerror})", "lora_path") from exc
        entry = Adapter(name=name, source=Source(path=folder.relative_to(artifacts).as_posix(), files=files))
        _write_adapters(manifests, manifest, [a for a in manifest.chat.adapters if a.name != name] + [entry])
    registry.reload(f"load adapter {name}")
    loaded = registry.entry(adapter_key(manifest.chat.base.name, name))
    if loaded is None or loaded.error is not None or loaded.served_spec != entry:
        reason = loaded.error if loaded is not None and loaded.error else "it was not loaded"
        if previous is None:
            _drop(settings, registry, name)
        else:  # the old version still serves: the manifest says so again
            with manifests.updating() as current:
                _write_adapters(manifests, current, [previous if a.name == name else a for a in current.chat.adapters])
            registry.reload(f"adapter {name} refused; its previous version stays")
        raise ApiError(422, f"adapter {name!r} cannot be served: {reason}", "lora_path")
    return f"Success: LoRA adapter '{name}' added successfully."


def _write_adapters(manifests, manifest, adapters: list[Adapter]) -> None:
    manifests.write(manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"adapters": adapters})}))


def unload_at_run_time(settings: Settings, registry: Registry, name: str) -> str:
    if not _drop(settings, registry, name):
        raise ApiError(404, f"lora_name: no adapter {name!r} is loaded", "lora_name", "not_found")
    return f"Success: LoRA adapter '{name}' removed successfully."


def _drop(settings: Settings, registry: Registry, name: str) -> bool:
    """Take the adapter out of the manifest and reload; False when the manifest has none of that name."""
    manifests = settings.manifests()
    with manifests.updating() as manifest:
        if manifest.chat is None or name not in {a.name for a in manifest.chat.adapters}:
            return False
        _write_adapters(manifests, manifest, [a for a in manifest.chat.adapters if a.name != name])
    registry.reload(f"unload adapter {name}")
    return True

