"""The weights manifest: one YAML file that says what the server serves.

Two files play the part. The *template* (`weights_manifest.yaml`, committed) names what to build
and serve, without checksums. The *built manifest* (`<artifact root>/weights_manifest.yaml`,
written by `training`) is the template plus the sha256 of every file a build wrote; the server
reads it when it exists, and the template otherwise.

Parsing is strict (pydantic, unknown keys refused). Every artifact path is relative to the
artifact root and must stay inside it; every weight file must be safetensors with a recorded
sha256 that is checked before anything is loaded. Every refusal names the file and why.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.artifacts import (
    PICKLE_SUFFIXES, ArtifactError, atomic_write_bytes, folder_digests, sha256_file, verify_file,
)

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]

class ManifestError(Exception):
    """The manifest itself cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """A model folder in diffusers/transformers layout: a local path or a hub id at a revision."""

    path: str | None = None
    hub: str | None = None
    revision: str | None = None
    # sha256 of files inside the folder, keyed by their path relative to it.
    files: dict[str, Sha256] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        if (self.path is None) == (self.hub is None):
            raise ValueError("a source has exactly one of 'path' or 'hub'")
        if self.hub is not None and not self.revision:
            raise ValueError(f"hub source {self.hub!r} needs a pinned 'revision'")
        return self


class Artifact(_Strict):
    """One safetensors file written by `training`."""

    path: str
    sha256: Sha256 | None = None  # absent until a local build records it; refused on load


class DataFile(_Strict):
    """Conversations a user's domain trained on (JSONL), kept for the router's refit; never served."""

    path: str
    sha256: Sha256


class ILFArtifact(Artifact):
    steps: int = Field(ge=1, le=1000)


class TextEncoder(_Strict):
    kind: Literal["minilm", "t5"]
    source: Source
    max_length: int = Field(120, ge=1, le=512)


class ImageModel(_Strict):
    name: Name
    kind: Literal["dit", "pixart"]
    source: Source  # subfolders transformer/, scheduler/ and (latent models) vae/
    text_encoder: TextEncoder | None = None
    labels: list[str] | None = None  # DiT class names, index = class id
    ilf: ILFArtifact | None = None
    default_steps: int = Field(20, ge=1, le=1000)
    default_guidance_scale: float = Field(4.0, ge=0)
    placeholder: bool = False  # untrained stand-in: served, but loudly flagged

    @model_validator(mode="after")
    def _conditioning(self) -> "ImageModel":
        if self.kind == "pixart" and self.text_encoder is None:
            raise ValueError(f"pixart model {self.name!r} needs a 'text_encoder'")
        if self.kind == "dit" and self.text_encoder is not None:
            raise ValueError(f"dit model {self.name!r} is class-conditional and takes no 'text_encoder'")
        if self.kind == "pixart" and self.labels is not None:
            raise ValueError(f"pixart model {self.name!r} is prompt-conditional and takes no 'labels'")
        return self


Precision = Literal["nf4", "none"]  # 4-bit NF4 through bitsandbytes, or the float weights as they are


class ChatBase(_Strict):
    name: Name
    source: Source
    # One precision for every device, or one per device ({cpu: none, cuda: nf4}): docs/chat.md
    # measures what NF4 costs against the float model.
    quantization: Precision | dict[Literal["cpu", "cuda"], Precision] = "nf4"
    placeholder: bool = False

    def precision(self, device: str) -> Precision:
        if isinstance(self.quantization, str):
            return self.quantization
        return self.quantization.get(device.split(":")[0], "nf4")


class Domain(_Strict):
    name: Name
    order: int = Field(ge=0)
    stacks: list[Artifact] = Field(default_factory=list)
    data: DataFile | None = None  # a user's domain: the conversations it trained on


class Adapter(_Strict):
    """A PEFT LoRA adapter: a folder with adapter_config.json and adapter_model.safetensors."""

    name: Name
    source: Source


class ChatSection(_Strict):
    base: ChatBase
    domains: list[Domain] = Field(default_factory=list)
    router: Artifact | None = None
    adapters: list[Adapter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_namespace(self) -> "ChatSection":
        """Domains and adapters are the names of one route: each name once."""
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate adapter names: {names}")
        if taken := sorted(set(names) & {d.name for d in self.domains}):
            raise ValueError(f"adapter {taken[0]!r} has the name of a domain: a route names each once")
        return self

    @field_validator("domains")
    @classmethod
    def _ordered_unique(cls, domains: list[Domain]) -> list[Domain]:
        names = [d.name for d in domains]
        orders = [d.order for d in domains]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate domain names: {names}")
        if len(set(orders)) != len(orders):
            raise ValueError(f"duplicate domain orders: {orders}")
        return sorted(domains, key=lambda d: d.order)


class Manifest(_Strict):
    version: Literal[1]
    image: list[ImageModel] = Field(default_factory=list)
    chat: ChatSection | None = None
    # Entries this manifest leaves out on purpose (their keys: see `entry_keys`). A served entry
    # missing from a manifest without being named here is taken for a cut manifest, which is refused
    # whole; `BuiltManifest.write` names what a build drops.
    removed: list[str] = Field(default_factory=list)

    @field_validator("image")
    @classmethod
    def _unique_names(cls, models: list[ImageModel]) -> list[ImageModel]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate image model names: {names}")
        return models


def ilf_key(model: str) -> str:
    return f"{model}/ilf"


def stacks_key(base: str, domain: str) -> str:
    return f"{base}/stacks/{domain}"


def router_key(base: str) -> str:
    return f"{base}/router"


def adapter_key(base: str, adapter: str) -> str:
    return f"{base}/adapters/{adapter}"


def entry_keys(manifest: Manifest) -> set[str]:
    """Every entry the manifest makes, by the key the server reports it under: an image model's name
    (and `<model>/ilf`), the chat base's name, `<base>/stacks/<domain>`, `<base>/router` and
    `<base>/adapters/<name>`."""
    keys = {m.name for m in manifest.image} | {ilf_key(m.name) for m in manifest.image if m.ilf is not None}
    if manifest.chat is not None:
        base = manifest.chat.base.name
        keys |= {base} | {stacks_key(base, d.name) for d in manifest.chat.domains}
        keys |= {router_key(base)} if manifest.chat.router is not None else set()
        keys |= {adapter_key(base, a.name) for a in manifest.chat.adapters}
    return keys


@dataclass(frozen=True)
class BuiltManifest:
    """The manifest files of one artifact root: `read` gives the built manifest, or the template
    while nothing is built; `write` writes the built manifest (atomically)."""

    template: Path
    path: Path  # the built manifest
    root: Path  # the artifact root: every manifest path is relative to it

    def current(self) -> Path:
        return self.path if self.path.exists() else self.template

    def read(self) -> Manifest:
        return load_manifest(self.current())

    def write(self, manifest: Manifest) -> None:
        """Write it (atomically), naming under `removed` every entry it drops from the manifest it
        replaces (and those that one had dropped, so a server that missed a version still sees them)."""
        removed = set(manifest.removed)
        try:
            previous = load_manifest(self.path) if self.path.exists() else None
        except ManifestError:
            previous = None
        if previous is not None:
            removed |= entry_keys(previous) | set(previous.removed)
        removed -= entry_keys(manifest)
        write_manifest(manifest.model_copy(update={"removed": sorted(removed)}), self.path)

    @contextmanager
    def updating(self) -> Iterator[Manifest]:
        """The current manifest, for a change written back with `write` inside the block: one writer
        at a time across processes (a lock file beside the built manifest), so that a server
        recording an adapter and a build recording a stack do not lose each other's entry."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.read()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def resolver(self, allow_network: bool = False) -> ArtifactResolver:
        return ArtifactResolver(self.root, allow_network)

    def file(self, relative: str) -> Path:
        """Where a manifest path lies on disk (for writers; readers go through the resolver)."""
        return self.root / relative

    def recorded(self, source: Source) -> Source:
        """The same (local) source with the sha256 of every file a build wrote into its folder."""
        return source.model_copy(update={"files": folder_digests(self.file(source.path))})


def load_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest file; ManifestError names the file and what is wrong."""
    try:
        raw = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"cannot read manifest {path}: not UTF-8 text (byte {exc.start})") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ManifestError(f"invalid manifest {path}: {problems}") from exc


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of either."""
    data = manifest.model_dump(mode="json", exclude_none=True)
    if not data["removed"]:
        del data["removed"]
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())


class ArtifactResolver:
    """Turns manifest paths (relative to the artifact root) into verified local paths inside it."""

    def __init__(self, artifact_root: Path, allow_network: bool = False):
        self.root = Path(artifact_root).resolve()
        self.allow_network = allow_network

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactError(relative, "resolves outside the artifact root")
        return path

    def artifact(self, artifact: Artifact) -> Path:
        """A verified safetensors file: inside the root, present, checksummed, readable."""
        path = self.resolve(artifact.path)
        verify_file(path, artifact.sha256)
        return path

    def source(self, source: Source) -> Path:
        """A model folder whose every file (weights, configs, tokenizers) is listed with its sha256 and
        matches it, with no pickle-format weights and no link that leaves the artifact root."""
        if source.hub is not None:
            folder = self._snapshot(source)
            if not source.files:
                # A pinned revision identifies the content; the hub client checks LFS hashes itself.
                return folder
        else:
            folder = self.resolve(source.path)
            if not folder.is_dir():
                raise ArtifactError(folder, "model folder does not exist")
            if not source.files:
                raise ArtifactError(
                    folder, "no file checksums recorded in the manifest; rebuild it with `python -m training`"
                )
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() in PICKLE_SUFFIXES:
                raise ArtifactError(file, "pickle-format weights are never loaded; convert to safetensors")
            if source.hub is not None:
                continue  # a snapshot's files are links into the hub cache; its pinned revision fixes them
            if not file.resolve().is_relative_to(self.root):
                raise ArtifactError(file, "links outside the artifact root")
            if file.is_file() and not file.name.startswith(".") and file.relative_to(folder).as_posix() not in source.files:
                raise ArtifactError(file, "has no sha256 in the manifest: every file a model folder loads must be listed")
        for rel, expected in source.files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ArtifactError(rel, f"listed file leaves its model folder {folder}")
            file = folder / rel  # not resolved: a hub snapshot's files are links into its blob store
            if not file.is_file():
                raise ArtifactError(file, "listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise ArtifactError(file, f"sha256 mismatch: manifest says {expected}, file is {actual}")
        return folder

    def _snapshot(self, source: Source) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(
                snapshot_download(
                    source.hub,
                    revision=source.revision,
                    # Only safetensors weights and text files: a pickle never reaches the disk.
                    allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
                    local_files_only=not self.allow_network,
                )
            )
        except LocalEntryNotFoundError as exc:
            raise ArtifactError(
                source.hub,
                "not in the local hub cache and network access is off (set LOOPSTACK_ALLOW_NETWORK=true)",
            ) from exc
