"""Where a build reads and writes: the template, the built manifest and the artifact root."""

from __future__ import annotations

from pathlib import Path

from server.manifest import BuiltManifest
from server.settings import Settings

STACKS = "chat"  # the chat zoo's stacks, router and users' domain data, under the artifact root


def open_manifest(artifact_root: Path | None = None, template: Path | None = None) -> BuiltManifest:
    """The manifest files of an artifact root (default: the LOOPSTACK_ settings' root and template).
    Builds read `current()` (the built manifest, or the template while nothing is built) and write
    the built manifest."""
    settings = Settings(_env_file=None)
    overrides = {k: v for k, v in (("artifact_root", artifact_root), ("template", template)) if v is not None}
    return settings.model_copy(update=overrides).manifests()


def runs_folder(manifests: BuiltManifest) -> Path:
    """Training logs, curves and evaluation reports: `runs/` beside the artifact root."""
    return manifests.root.parent / "runs"


def checked_file(manifests: BuiltManifest, entry, what: str) -> Path:
    """The file a manifest entry (path, sha256) names, or SystemExit when it is missing or changed."""
    from server.artifacts import sha256_file

    path = manifests.file(entry.path)
    if not path.is_file() or sha256_file(path) != entry.sha256:
        raise SystemExit(f"{path}: {what} is missing or changed since it was recorded")
    return path


def machine(device: str) -> str:
    """What a measurement ran on, for its report."""
    import torch

    if device == "cpu":
        return f"{torch.get_num_threads()} torch threads, CPU"
    return torch.cuda.get_device_name(device)
