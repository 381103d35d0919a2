"""Artifact files: how every writer writes them and every reader checks them.

Writers (the `training` package) write atomically: a reader sees the old file or folder or the
new one, never half of either. Readers (the server, and training when it resumes) verify a
checksum before they load, load safetensors only, and read a model's configuration from the
file's own metadata. Every refusal is an `ArtifactError` that names the file and the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Formats that unpickle on load: never accepted, wherever they appear.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


class ArtifactError(Exception):
    """An artifact (file or model folder) was refused; the message names it and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"refused {self.path}: {reason}")


# ---------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# tempfile makes files 0600 and folders 0700; an artifact gets the mode open() and mkdir() would give
# it, so that a server running as another user (a container's, on a shared volume) can read it.


def write_atomically(path: Path, write: Callable[[Path], None]) -> str:
    """`write(tmp)` into a temporary sibling, then rename it over `path`; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(path)


def atomic_write_bytes(path: Path, data: bytes) -> str:
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Build into a temporary sibling folder; swap it in only when the build finished."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.building-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------- checksums
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, keyed by relative path (what a build records)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def verify_file(path: Path, expected: str | None) -> None:
    """A present safetensors file whose sha256 is the one the manifest recorded."""
    if path.suffix != ".safetensors":
        raise ArtifactError(path, "only .safetensors artifacts are loaded (no pickle formats)")
    if not path.is_file():
        raise ArtifactError(path, "file does not exist")
    if expected is None:
        raise ArtifactError(path, "no sha256 recorded in the manifest; rebuild it with `python -m training`")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(path, f"sha256 mismatch: manifest says {expected}, file is {actual}")
    check_safetensors_header(path)


def check_safetensors_header(path: Path) -> None:
    """A half-written or foreign file fails here with a clear reason, not deep inside a loader."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise ArtifactError(path, f"not a readable safetensors file ({exc})") from exc


def own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copy the CPU weights that a loader left memory-mapped from their safetensors files into memory
    of their own. A file truncated or replaced under a serving model must be refused at the next
    reload, not crash the process with SIGBUS at the next request that reads a mapped page."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    return module


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc's malloc_trim; elsewhere nothing):
    glibc keeps freed heap in the process otherwise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- safetensors with a JSON config
def save_with_config(path: Path, tensors: dict[str, torch.Tensor], key: str, config: dict) -> None:
    """Tensors plus the configuration that rebuilds their module, under `key` in the file's metadata."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={key: json.dumps(config)})


def read_config(path: Path, key: str, what: str) -> dict:
    """The JSON configuration a `save_with_config` file carries; refused as not a `what` otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()[key])
    except (KeyError, TypeError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(path, f"not a {what} ({exc})") from exc


def load_with_config(path: Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    config = read_config(path, key, what)
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, config
