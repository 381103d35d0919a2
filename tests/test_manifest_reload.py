"""A manifest is taken whole or refused whole: cut, unreadable or not UTF-8, it is refused like a bad
artifact and the running set keeps serving; a model goes only when the manifest says so; a refusal
lasts only as long as its cause."""

from __future__ import annotations

import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import BuiltManifest, ImageModel, Source, load_manifest, write_manifest
from tests.conftest import make_settings, zoo_manifest

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"prompt": "hi", "max_tokens": 2}


@pytest.fixture()
def served(zoo_dir, tmp_path):
    """A copy of the tiny zoo, served by an app with the admin routes on (no watching: reloads are explicit)."""
    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    path = tmp_path / "weights_manifest.yaml"
    write_manifest(zoo_manifest(tmp_path), path)
    app = create_app(make_settings(path, admin_token=TOKEN, watch=False), load_in_background=False)
    with TestClient(app) as client:
        yield client, path


def refused_gauge(client) -> float:
    metrics = client.app.state.services.metrics.registry
    return metrics.get_sample_value("loopstack_artifact_refused", {"model": "manifest"})


def test_a_manifest_cut_before_its_chat_section_is_refused_and_chat_keeps_serving(served):
    client, path = served
    text = path.read_text()
    path.write_text(text[:text.index("chat:")])  # a copy or an edit that stopped half way
    report = client.post("/admin/reload", headers=AUTH).json()
    assert [r["entry"] for r in report["refused"]] == ["manifest"]
    assert "tiny-lm" in report["refused"][0]["reason"] and "removed" in report["refused"][0]["reason"]
    assert client.post("/chat", json=CHAT).status_code == 200
    ready = client.get("/readyz").json()
    assert "tiny-lm" in ready["serving"] and ready["loading"] == []
    assert client.get("/admin/status", headers=AUTH).json()["manifest_error"] and refused_gauge(client) == 1.0


def test_a_manifest_of_only_its_version_unloads_nothing(served):
    client, path = served
    path.write_text("version: 1\n")
    assert client.post("/admin/reload", headers=AUTH).json()["refused"][0]["entry"] == "manifest"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and set(ready.json()["serving"]) == {"tiny-dit", "tiny-dit-latent",
                                                                          "tiny-pixart", "tiny-lm"}


def test_a_model_named_under_removed_goes_and_the_log_says_so(served, caplog):
    client, path = served
    manifest = load_manifest(path)
    kept = [m for m in manifest.image if m.name != "tiny-dit-latent"]
    write_manifest(manifest.model_copy(update={"image": kept, "removed": ["tiny-dit-latent"]}), path)
    with caplog.at_level(logging.INFO, logger="server.registry"):
        report = client.post("/admin/reload", headers=AUTH).json()
    assert report["refused"] == [] and refused_gauge(client) == 0.0
    assert "tiny-dit-latent" not in client.get("/readyz").json()["serving"]
    assert any("removed tiny-dit-latent" in r.getMessage() for r in caplog.records)


def test_a_manifest_that_is_not_utf8_is_refused_and_reported_not_a_500(served):
    client, path = served
    path.write_bytes(b"version: 1\nimage:\n- name: caf\xe9\n")
    answer = client.post("/admin/reload", headers=AUTH)
    assert answer.status_code == 200 and answer.json()["refused"][0]["entry"] == "manifest"
    status = client.get("/admin/status", headers=AUTH).json()
    assert "not UTF-8" in status["manifest_error"] and refused_gauge(client) == 1.0
    assert client.get("/readyz").status_code == 200


def test_a_refusal_ends_when_the_manifest_is_back_to_what_serves(served):
    client, path = served
    good = path.read_bytes()
    manifest = load_manifest(path)
    bad = [m.model_copy(update={"source": Source(path="../outside", files=m.source.files)}) if m.name == "tiny-dit"
           else m for m in manifest.image]
    write_manifest(manifest.model_copy(update={"image": bad}), path)
    assert [r["entry"] for r in client.post("/admin/reload", headers=AUTH).json()["refused"]] == ["tiny-dit"]
    assert client.get("/readyz").json()["failed"] == ["tiny-dit"]
    path.write_bytes(good)  # byte for byte the manifest that serves
    client.post("/admin/reload", headers=AUTH)
    card = next(c for c in client.get("/v1/models").json()["data"] if c["id"] == "tiny-dit")
    metrics = client.app.state.services.metrics.registry
    assert client.get("/readyz").json()["failed"] == [] and card["errors"] == []
    assert metrics.get_sample_value("loopstack_artifact_refused", {"model": "tiny-dit"}) == 0.0


def test_a_build_names_what_it_drops_so_the_server_removes_it(tmp_path):
    """`BuiltManifest.write` (every training verb's) names dropped entries, across versions a server
    may not have read."""
    manifests = BuiltManifest(tmp_path / "template.yaml", tmp_path / "weights_manifest.yaml", tmp_path)
    first = zoo_manifest(tmp_path)
    manifests.write(first)
    assert manifests.read().removed == []
    without_chat = first.model_copy(update={"chat": None})
    manifests.write(without_chat)
    assert set(manifests.read().removed) == {"tiny-lm", "tiny-lm/stacks/chat", "tiny-lm/stacks/math"}
    extra = ImageModel(name="tiny-extra", kind="dit", source=Source(path="artifacts/dit"))
    manifests.write(without_chat.model_copy(update={"image": [extra]}))  # the chat model is still gone
    assert "tiny-lm" in manifests.read().removed and "tiny-dit" in manifests.read().removed
    manifests.write(first)  # everything back: only what this write drops is named
    assert manifests.read().removed == ["tiny-extra"]
