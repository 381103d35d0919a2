"""`python -m training zoo placeholder`: what `make serve` runs on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import load_manifest
from training.__main__ import main as training_main
from training.zoo.build import default_manifest
from tests.conftest import make_settings


def without_local_build(manifest):
    """What a local build adds (checksums, the placeholder flag, ILF modules) removed again."""
    data = manifest.model_dump(mode="json", exclude_none=True)
    for entry in data["image"] + [data["chat"]["base"]]:
        entry.pop("placeholder", None)
        entry.pop("ilf", None)
        entry["source"].pop("files", None)
        entry.get("text_encoder", {}).get("source", {}).pop("files", None)
    return data


def test_repository_manifest_names_the_embedded_zoo():
    repo = Path(__file__).resolve().parent.parent
    committed = load_manifest(repo / "weights_manifest.yaml")  # may carry this machine's checksums
    assert without_local_build(committed) == without_local_build(default_manifest())


def test_placeholder_zoo_builds_a_servable_manifest(tmp_path):
    manifest = tmp_path / "weights_manifest.yaml"
    manifest.write_text(yaml.safe_dump(default_manifest().model_dump(mode="json", exclude_none=True)))
    training_main(["zoo", "placeholder", "--manifest", str(manifest)])

    built = load_manifest(manifest)
    assert all(m.placeholder and m.source.files for m in built.image)
    assert built.chat.base.placeholder and built.chat.base.source.files
    stamp = manifest.stat().st_mtime_ns
    training_main(["zoo", "placeholder", "--manifest", str(manifest), "--if-missing"])
    assert manifest.stat().st_mtime_ns == stamp  # already built: untouched

    with TestClient(create_app(make_settings(manifest), load_in_background=False)) as c:
        assert c.get("/readyz").status_code == 200
        cards = c.get("/v1/models").json()["data"]
        assert {m["id"] for m in cards} == {"digits-dit", "digits-pixart", "zoo-lm"}
        assert all(m["placeholder"] for m in cards)
        image = c.post("/generate-image", json={"model": "digits-pixart", "prompt": "a handwritten seven",
                                               "steps": 2})
        assert image.status_code == 200 and image.json()["placeholder"] is True
        assert c.post("/chat", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
