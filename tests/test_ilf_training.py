"""ILF distillation on the tiny zoo: only the feedback module learns, and its artifact is served."""

from __future__ import annotations

import shutil

import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import load_manifest
from server.artifacts import sha256_file
from tests.conftest import built, make_settings
from tests.test_ilf import backbone_named
from training.ilf_distill import ILFTraining, distil, train_ilf

TINY = ILFTraining(loop_start=1, loop_end=1, steps=2, updates=6, batch_size=4, pool_size=8, refresh_every=3)


def test_distillation_trains_only_the_feedback_module(manifest_path):
    backbone = backbone_named(manifest_path, "tiny-pixart")
    before = {k: v.clone() for k, v in backbone.transformer.state_dict().items()}
    feedback, config, history = distil(backbone, TINY)

    after = backbone.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical backbone
    assert all(p.grad is None for p in backbone.transformer.parameters())
    assert feedback.scale.abs().sum() > 0  # s started at zero: gradients reached it
    template = backbone.transformer.transformer_blocks[config.loop_end].state_dict()
    assert any(not torch.equal(v, template[k]) for k, v in feedback.block.state_dict().items())
    assert config.teacher_steps == 4 and len(history) >= 2 and all(h["loss"] >= 0 for h in history)


def test_trained_module_is_written_recorded_and_served(zoo_dir, manifest_path, tmp_path):
    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    manifest = tmp_path / "weights_manifest.yaml"
    shutil.copy(manifest_path, manifest)
    path = train_ilf(built(manifest), "tiny-dit", TINY, runs_dir=tmp_path / "runs")

    entry = next(m for m in load_manifest(manifest).image if m.name == "tiny-dit").ilf
    assert entry.steps == 2 and entry.sha256 == sha256_file(path)
    assert (tmp_path / "runs" / "tiny-dit" / "loss.png").is_file()
    assert not list(path.parent.glob(".*.tmp"))
    with TestClient(create_app(make_settings(manifest), load_in_background=False)) as c:
        body = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1}).json()
        assert body["mode"] == "ilf" and body["steps"] == 2 and body["block_evaluations"] == 2 * 4
    # `make serve` distils with --if-missing: a second run leaves the module alone
    assert train_ilf(built(manifest), "tiny-dit", TINY, runs_dir=tmp_path / "runs", if_missing=True) is None
    assert next(m for m in load_manifest(manifest).image if m.name == "tiny-dit").ilf == entry
