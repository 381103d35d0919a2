"""ILF distillation on the tiny zoo: only the feedback module learns, and its artifact is served."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import load_manifest
from server.artifacts import load_with_config, sha256_file
from server.imaging.ilf import ILFConfig
from tests.conftest import built, make_settings
from tests.test_ilf import backbone_named
from training.ilf_conditions import Conditions
from training.ilf_distill import (MICRO_ILF, TRAINING_SEED_BASE, VALIDATION_SEED_BASE, ILFTraining, distil,
                                  train_ilf)

TINY = MICRO_ILF


def test_distillation_trains_only_the_feedback_module(manifest_path):
    backbone = backbone_named(manifest_path, "tiny-pixart")
    before = {k: v.clone() for k, v in backbone.transformer.state_dict().items()}
    feedback, config, history = distil(backbone, TINY, conditions=Conditions(("a red square", "a blue disc"),
                                                                             ("a green line",)))

    after = backbone.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical backbone
    assert all(p.grad is None for p in backbone.transformer.parameters())
    assert feedback.scale.abs().sum() > 0  # s started at zero: gradients reached it
    template = backbone.transformer.transformer_blocks[config.loop_end].state_dict()
    assert any(not torch.equal(v, template[k]) for k, v in feedback.block.state_dict().items())
    assert config.teacher_steps == 4 and len(history) >= 2 and all(h["loss"] >= 0 for h in history if "loss" in h)


def test_distillation_rolls_out_keeps_the_best_validated_module_and_records_its_guidance_range(manifest_path):
    backbone = backbone_named(manifest_path, "tiny-dit")  # default guidance 2.0, 4 default steps
    feedback, config, history = distil(backbone, TINY)
    phases = [h["phase"] for h in history if "phase" in h]
    assert phases[0] == "start" and phases.count("teacher forcing") >= 1 and phases[-1] == "rollout"
    validated = [h for h in history if "validation_psnr" in h and "kept" not in h]
    assert len(validated) == 1 + (TINY.updates + TINY.rollout_updates) // TINY.validate_every
    kept = history[-1]
    best = max(validated, key=lambda h: h["validation_psnr"])
    assert kept["validation_psnr"] == best["validation_psnr"]
    assert kept["kept"] == (0 if best["phase"] == "start" else best["update"] + 1)
    assert tuple(config.guidance_range) == (1.0, 4.0) and config.reference_steps == 4
    # the default distils at the model's default guidance alone, and serves that alone
    assert ILFTraining().guidance_max_factor == 0
    single = distil(backbone, replace(TINY, guidance_max_factor=0.0, updates=1, rollout_updates=1))[1]
    assert single.served_guidance == (2.0, 2.0)


def test_training_and_validation_noise_stay_clear_of_the_yardsticks_seeds(manifest_path):
    """A regression guard (the ranges are constants): the reported evaluation's seeds are never trained
    or validated on."""
    from training.eval.images import Protocol, eval_set

    reported = set(eval_set(backbone_named(manifest_path, "tiny-dit"), Protocol()).seeds)
    validation = set(range(VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + 10_000))
    training = set(range(TRAINING_SEED_BASE, TRAINING_SEED_BASE + 100_000))
    assert not (reported & validation or reported & training or validation & training)


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
        # distilled across guidance 1-4 (twice the model's default, 2.0): ILF serves that range only
        inside = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "guidance_scale": 4.0})
        assert inside.json()["mode"] == "ilf"
        outside = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "guidance_scale": 5.0,
                                                  "mode": "ilf"})
        assert outside.status_code == 422 and outside.json()["error"]["param"] == "guidance_scale"
        unasked = c.post("/generate-image", json={"model": "tiny-dit", "class_label": 1, "guidance_scale": 5.0})
        assert unasked.status_code == 200 and unasked.json()["mode"] == "baseline"
    # `make serve` distils with --if-missing: a second run leaves the module alone
    assert train_ilf(built(manifest), "tiny-dit", TINY, runs_dir=tmp_path / "runs", if_missing=True) is None
    assert next(m for m in load_manifest(manifest).image if m.name == "tiny-dit").ilf == entry


def test_the_ablation_distils_each_variant_and_measures_it_on_validation_seeds(zoo_dir, manifest_path, tmp_path):
    from training.eval.ilf_ablation import VARIANTS, run_ablation

    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    manifest_path = shutil.copy(manifest_path, tmp_path / "weights_manifest.yaml")  # it installs the winner
    variants = {name: VARIANTS[name] for name in ("one-step", "+ guidance")}
    rows = run_ablation(built(manifest_path), "tiny-dit", tmp_path, base=replace(TINY, rollout_updates=2),
                        per_class=1, variants=variants, install=True)
    assert [r["variant"] for r in rows] == ["one-step", "+ guidance"]
    for row in rows:  # guidance 1, the default (2) and twice it
        assert list(row["psnr"]) == ["1", "2", "4"]
        assert all(p["ci95"][0] <= p["mean"] <= p["ci95"][1] for p in row["psnr"].values())
    written = json.loads((tmp_path / "ilf-ablation-tiny-dit.json").read_text())
    assert written["seed_base"] == VALIDATION_SEED_BASE and written["images"] == 10
    assert "| + guidance |" in (tmp_path / "ilf-ablation-tiny-dit.md").read_text()
    # the winner at the default guidance is served: its range tells which variant it was
    winner = max(rows, key=lambda row: row["psnr"]["2"]["mean"])["variant"]
    entry = next(m for m in load_manifest(manifest_path).image if m.name == "tiny-dit").ilf
    served = ILFConfig(**load_with_config(built(manifest_path).file(entry.path), "ilf_config", "ILF")[1])
    assert served.served_guidance == ((2.0, 2.0) if winner == "one-step" else (1.0, 4.0))


def test_ilf_distils_on_conditions_from_a_file_and_the_module_serves(zoo_dir, manifest_path, tmp_path):
    """DiT- and PixArt-shaped backbones distilled on class ids and prompts read from files, nothing
    about digits on the path; a file that names no class of the model, or no file for a text-to-image
    model, is refused before any work."""
    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    manifest = shutil.copy(manifest_path, tmp_path / "weights_manifest.yaml")
    (tmp_path / "ids.txt").write_text("# the two classes served\n1\n2\n")
    (tmp_path / "prompts.txt").write_text("a red square\na blue disc\na green line\na yellow ring\n")
    for model, conditions, served in (("tiny-dit", "ids.txt", {"class_label": 1}),
                                      ("tiny-pixart", "prompts.txt", {"prompt": "a red square"})):
        train_ilf(built(manifest), model, TINY, runs_dir=tmp_path / "runs", conditions=tmp_path / conditions)
        kept = json.loads((tmp_path / "runs" / model / "training.json").read_text())["history"][-1]
        assert str(tmp_path / conditions) in kept["conditions"]
        assert (kept["train_conditions"], kept["val_conditions"]) == ((2, 2) if model == "tiny-dit" else (3, 1))
        with TestClient(create_app(make_settings(manifest), load_in_background=False)) as c:
            assert c.post("/generate-image", json={"model": model, **served}).json()["mode"] == "ilf"
    (tmp_path / "bad.txt").write_text("1\n99\n")
    with pytest.raises(SystemExit, match="line 2: '99'"):
        train_ilf(built(manifest), "tiny-dit", TINY, conditions=tmp_path / "bad.txt")
    with pytest.raises(SystemExit, match="text-to-image"):
        distil(backbone_named(manifest_path, "tiny-pixart"), TINY)
