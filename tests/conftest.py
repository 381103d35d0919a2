"""Tiny random models in the server's real layouts, a manifest naming them, and the app on top."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import ChatBase, ChatSection, Domain, ImageModel, Manifest, Source, TextEncoder, write_manifest
from server.artifacts import folder_digests
from server.settings import Settings
from training.zoo import placeholders as ph

torch.set_num_threads(2)


def recorded_source(root: Path, rel: str) -> Source:
    return Source(path=rel, files=folder_digests(root / rel))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """Builds once per session (seconds): pixel DiT, latent DiT with a VAE, PixArt + encoder, Llama."""
    root = tmp_path_factory.mktemp("zoo")
    art = root / "artifacts"
    ph.build_dit(art / "dit")
    ph.build_dit(art / "dit-latent", ph.TinyImageShape(sample_size=8, channels=4), num_classes=3)
    ph.build_vae(art / "dit-latent")
    ph.build_pixart(art / "pixart", caption_channels=32)
    ph.build_text_encoder(art / "encoder", hidden_size=32)
    ph.build_llama(art / "lm")
    return root


def zoo_manifest(root: Path, **chat_overrides) -> Manifest:
    return Manifest(
        version=1,
        image=[
            ImageModel(name="tiny-dit", kind="dit", source=recorded_source(root, "artifacts/dit"),
                       labels=ph.DIGIT_NAMES, default_steps=4, default_guidance_scale=2.0),
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
    return Settings(manifest=manifest, device="cpu", _env_file=None, **overrides)


@pytest.fixture(scope="session")
def client(manifest_path):
    app = create_app(make_settings(manifest_path), load_in_background=False)
    with TestClient(app) as c:
        yield c


def assert_error_shape(response, status: int | None = None, param: str | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message", "param"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]
