"""The manifest refuses what it must, and every refusal names the file and the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from server.manifest import Artifact, ArtifactResolver, ManifestError, Source, load_manifest, write_manifest
from server.artifacts import ArtifactError, sha256_file
from server.metrics import Metrics
from server.registry import Registry
from tests.conftest import make_settings, zoo_manifest


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(**image) -> dict:
    entry = {"name": "m", "kind": "dit", "source": {"path": "artifacts/m"}} | image
    return {"version": 1, "image": [entry]}


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"version": 2}, "version"),
        (minimal(kind="unet"), "kind"),
        (minimal(kind="pixart"), "needs a 'text_encoder'"),
        (minimal(source={"hub": "facebook/DiT-XL-2-256"}), "revision"),
        (minimal(source={"path": "a", "hub": "b", "revision": "main"}), "exactly one"),
        (minimal(colour="blue"), "colour"),
        ({"version": 1, "image": [minimal()["image"][0]] * 2}, "duplicate"),
        ({"version": 1, "chat": {"base": {"name": "lm", "source": {"path": "x"}, "quantization": "int3"}}},
         "quantization"),
    ],
)
def test_invalid_manifest_is_refused_with_file_and_reason(tmp_path, data, fragment):
    path = write_yaml(tmp_path / "weights_manifest.yaml", data)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_domains_are_served_in_their_order(manifest_path):
    manifest = load_manifest(manifest_path)
    assert [d.name for d in manifest.chat.domains] == ["chat", "math"]


def test_write_manifest_round_trips_and_leaves_no_temp_files(tmp_path, zoo_dir):
    path = tmp_path / "m.yaml"
    manifest = zoo_manifest(zoo_dir)
    write_manifest(manifest, path)
    assert load_manifest(path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["m.yaml"]


@pytest.fixture()
def artifact_dir(tmp_path) -> Path:
    root = tmp_path / "artifacts"
    root.mkdir()
    save_file({"w": torch.arange(6.0)}, root / "stack.safetensors")
    return root


def resolver_for(tmp_path: Path) -> ArtifactResolver:
    return ArtifactResolver(tmp_path / "artifacts")


def test_verified_artifact_loads(tmp_path, artifact_dir):
    good = Artifact(path="stack.safetensors", sha256=sha256_file(artifact_dir / "stack.safetensors"))
    assert resolver_for(tmp_path).artifact(good) == (artifact_dir / "stack.safetensors").resolve()


def test_checksum_mismatch_is_refused(tmp_path, artifact_dir):
    bad = Artifact(path="stack.safetensors", sha256="0" * 64)
    with pytest.raises(ArtifactError) as err:
        resolver_for(tmp_path).artifact(bad)
    assert "stack.safetensors" in str(err.value) and "sha256 mismatch" in str(err.value)


def test_missing_checksum_is_refused(tmp_path, artifact_dir):
    with pytest.raises(ArtifactError, match="no sha256 recorded"):
        resolver_for(tmp_path).artifact(Artifact(path="stack.safetensors"))


def test_path_outside_artifact_root_is_refused(tmp_path, artifact_dir):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(artifact_dir / "stack.safetensors", outside)
    escape = Artifact(path="../elsewhere.safetensors", sha256=sha256_file(outside))
    with pytest.raises(ArtifactError) as err:
        resolver_for(tmp_path).artifact(escape)
    assert "outside the artifact root" in str(err.value) and "elsewhere.safetensors" in str(err.value)


def test_symlink_out_of_the_root_is_refused(tmp_path, artifact_dir):
    outside = tmp_path / "secret.safetensors"
    shutil.copy(artifact_dir / "stack.safetensors", outside)
    (artifact_dir / "link.safetensors").symlink_to(outside)
    link = Artifact(path="link.safetensors", sha256=sha256_file(outside))
    with pytest.raises(ArtifactError, match="outside the artifact root"):
        resolver_for(tmp_path).artifact(link)


def test_pickle_artifact_is_refused(tmp_path, artifact_dir):
    torch.save({"w": torch.zeros(2)}, artifact_dir / "stack.pt")
    pickled = Artifact(path="stack.pt", sha256=sha256_file(artifact_dir / "stack.pt"))
    with pytest.raises(ArtifactError) as err:
        resolver_for(tmp_path).artifact(pickled)
    assert "stack.pt" in str(err.value) and "safetensors" in str(err.value)


def test_half_written_artifact_is_refused_even_with_matching_checksum(tmp_path, artifact_dir):
    data = (artifact_dir / "stack.safetensors").read_bytes()
    (artifact_dir / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cut = Artifact(path="cut.safetensors", sha256=sha256_file(artifact_dir / "cut.safetensors"))
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        resolver_for(tmp_path).artifact(cut)


def copy_model(zoo_dir: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / "artifacts" / name
    shutil.copytree(zoo_dir / "artifacts" / name, target)
    return target


def test_model_folder_with_pickle_weights_is_refused(tmp_path, zoo_dir):
    folder = copy_model(zoo_dir, tmp_path, "dit")
    from server.artifacts import folder_digests

    source = Source(path="dit", files=folder_digests(folder))
    torch.save({"w": torch.zeros(2)}, folder / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ArtifactError) as err:
        resolver_for(tmp_path).source(source)
    assert "diffusion_pytorch_model.bin" in str(err.value) and "pickle" in str(err.value)


def test_model_folder_with_tampered_weights_is_refused(tmp_path, zoo_dir):
    folder = copy_model(zoo_dir, tmp_path, "dit")
    from server.artifacts import folder_digests

    source = Source(path="dit", files=folder_digests(folder))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ArtifactError) as err:
        resolver_for(tmp_path).source(source)
    assert "diffusion_pytorch_model.safetensors" in str(err.value) and "sha256 mismatch" in str(err.value)


def test_model_folder_without_checksums_is_refused(tmp_path, zoo_dir):
    copy_model(zoo_dir, tmp_path, "dit")
    with pytest.raises(ArtifactError, match="no file checksums recorded"):
        resolver_for(tmp_path).source(Source(path="dit"))


def test_hub_source_is_not_downloaded_when_network_is_off(tmp_path):
    hub = Source(hub="facebook/DiT-XL-2-256", revision="main")
    with pytest.raises(ArtifactError, match="network access is off"):
        resolver_for(tmp_path).source(hub)


def test_failed_reload_keeps_the_old_models_serving(tmp_path, zoo_dir):
    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    manifest = zoo_manifest(tmp_path)
    manifest = manifest.model_copy(update={"image": manifest.image[:1], "chat": None})
    path = tmp_path / "weights_manifest.yaml"
    write_manifest(manifest, path)
    metrics = Metrics()
    registry = Registry(make_settings(path), metrics)
    registry.reload()
    first = registry.current

    weights = tmp_path / "artifacts" / "dit" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"garbage")
    report = registry.reload()
    assert registry.current is first  # the old generation keeps serving
    assert [r["entry"] for r in report["refused"]] == ["tiny-dit"] and "sha256 mismatch" in report["refused"][0]["reason"]
    assert str(tmp_path) not in report["refused"][0]["reason"]  # relative paths only
    assert registry.entry("tiny-dit").state == "ready" and "sha256 mismatch" in registry.entry("tiny-dit").error
    assert metrics.artifact_reloads.labels(model="tiny-dit", result="refused")._value.get() == 1
    assert metrics.artifact_reloads.labels(model="tiny-dit", result="loaded")._value.get() == 1


def test_listed_file_outside_its_model_folder_is_refused(tmp_path, zoo_dir):
    folder = copy_model(zoo_dir, tmp_path, "dit")
    from server.artifacts import folder_digests

    files = folder_digests(folder) | {"../dit/transformer/config.json": "0" * 64}
    with pytest.raises(ArtifactError, match="leaves its model folder"):
        resolver_for(tmp_path).source(Source(path="dit", files=files))
