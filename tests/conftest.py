"""Tiny random models in the server's real layouts, a manifest naming them, and the app on top."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.artifacts import folder_digests
from server.manifest import (
    BuiltManifest, ChatBase, ChatSection, Domain, ImageModel, Manifest, Source, TextEncoder, load_manifest,
    write_manifest,
)
from server.settings import Settings
from tests.builders import build_text_encoder, build_vae
from training.data.digits import DIGIT_NAMES
from training.zoo.architectures import ImageShape, build_dit, build_pixart
from training.zoo.language import build_llama

torch.set_num_threads(2)


def recorded_source(root: Path, rel: str) -> Source:
    return Source(path=rel, files=folder_digests(root / rel))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """Builds once per session (seconds): pixel DiT, latent DiT with a VAE, PixArt + encoder, Llama."""
    root = tmp_path_factory.mktemp("zoo")
    art = root / "artifacts"
    build_dit(art / "dit")
    build_dit(art / "dit-latent", ImageShape(sample_size=8, channels=4), num_classes=3)
    build_vae(art / "dit-latent")
    build_pixart(art / "pixart", caption_channels=32)
    build_text_encoder(art / "encoder", hidden_size=32)
    build_llama(art / "lm")
    return root


def zoo_manifest(root: Path, **chat_overrides) -> Manifest:
    return Manifest(
        version=1,
        image=[
            ImageModel(name="tiny-dit", kind="dit", source=recorded_source(root, "artifacts/dit"),
                       labels=DIGIT_NAMES, default_steps=4, default_guidance_scale=2.0),
            ImageModel(name="tiny-dit-latent", kind="dit", source=recorded_source(root, "artifacts/dit-latent"),
                       default_steps=3),
            ImageModel(name="tiny-pixart", kind="pixart", source=recorded_source(root, "artifacts/pixart"),
                       text_encoder=TextEncoder(kind="minilm", source=recorded_source(root, "artifacts/encoder"),
                                                max_length=16),
                       default_steps=4, default_guidance_scale=3.0),
        ],
        chat=ChatSection(
            base=ChatBase(name="tiny-lm", source=recorded_source(root, "artifacts/lm"), quantization="nf4"),
            domains=[Domain(name="math", order=1), Domain(name="chat", order=0)],
            **chat_overrides,
        ),
    )


@pytest.fixture(scope="session")
def manifest_path(zoo_dir) -> Path:
    path = zoo_dir / "weights_manifest.yaml"
    write_manifest(zoo_manifest(zoo_dir), path)
    return path


def make_settings(manifest: Path, **overrides) -> Settings:
    """Settings that serve this manifest; its paths are relative to its own folder."""
    return Settings(manifest=manifest, artifact_root=Path(manifest).parent, device="cpu", _env_file=None,
                    **overrides)


def built(manifest: Path) -> BuiltManifest:
    """A manifest as the built manifest of its own folder (what training functions read and write)."""
    return make_settings(manifest).manifests()


REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "weights_manifest.yaml"
ZOO_LM_TEMPLATE = REPO_TEMPLATE.parent / "training" / "zoo" / "zoo-lm.yaml"  # the chat zoo a test trains in seconds


@contextmanager
def live_server(app, settings: Settings) -> Iterator[str]:
    """The app under uvicorn as `python -m server` runs it, on a free loopback port: its base URL."""
    with running_server(app, settings) as (url, _):
        yield url


@contextmanager
def running_server(app, settings: Settings) -> Iterator[tuple[str, object]]:
    """`live_server`'s base URL and its uvicorn server (`should_exit = True` begins its shutdown)."""
    import socket
    import threading

    import uvicorn

    from server.serve import uvicorn_config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, settings, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def client(manifest_path):
    app = create_app(make_settings(manifest_path), load_in_background=False)
    with TestClient(app) as c:
        yield c


def assert_error_shape(response, status: int | None = None, param: str | None = None) -> dict:
    if status is not None:  # a 5xx only where the test names it (504: a deadline)
        assert response.status_code == status, (response.status_code, response.text)
    assert 400 <= response.status_code < (600 if status else 500), (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "param"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def per_job(fake):
    """A fake of `sample` (one request) as the image batcher's batch sampler: each job of a batch in
    turn, an exception ending that job alone (as a row leaving a real batch)."""

    def sample_batch(backbone, jobs, progress=None, *args, **kwargs):
        outcomes = []
        for job, check in zip(jobs, progress or [None] * len(jobs)):
            try:
                outcomes.append(fake(backbone, job, progress=check))
            except Exception as stop:
                outcomes.append(stop)
        return outcomes

    return sample_batch
