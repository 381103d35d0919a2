"""The image yardstick: metrics on known inputs, the classifier's own accuracy, and the whole
zoo-to-eval path on a micro build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.manifest import load_manifest
from server.artifacts import sha256_file
from training.data.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, digit_split
from training.eval.classifier import accuracy, train_classifier
from training.eval.images import Protocol, run_image_eval
from training.ilf_distill import MICRO_ILF, train_ilf
from training.metrics import PSNR_CAP_DB, bootstrap_interval, frechet_distance, psnr, ssim
from training.artifacts import open_manifest
from training.zoo.placeholders import build_placeholder_zoo
from training.zoo.images import MICRO, build_image_zoo
from tests.conftest import make_settings


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    feats = np.random.default_rng(0).normal(size=(400, 8))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    small, large = frechet_distance(feats, feats + 0.5), frechet_distance(feats, feats + 2.0)
    assert small == pytest.approx(8 * 0.25, rel=1e-3) and large == pytest.approx(8 * 4.0, rel=1e-3)


def test_bootstrap_interval_brackets_the_statistic():
    values = np.random.default_rng(1).normal(3.0, 1.0, size=500)
    lo, hi = bootstrap_interval(np.mean, values, rounds=300)
    assert lo < values.mean() < hi and hi - lo < 0.3


def test_recentred_interval_brackets_a_biased_statistic():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) + 0.1
    estimate = frechet_distance(fake, real)
    raw = bootstrap_interval(frechet_distance, fake, real, rounds=100)
    lo, hi = bootstrap_interval(frechet_distance, fake, real, rounds=100, recentre=True)
    assert raw[0] > estimate  # resampling duplicates inflate the distance ...
    assert lo < estimate < hi  # ... and recentring removes that bias


def test_psnr_and_ssim_on_known_images():
    images = torch.rand(4, 1, 16, 16)
    assert torch.all(psnr(images, images) == PSNR_CAP_DB)
    torch.testing.assert_close(ssim(images, images), torch.ones(4))
    noise = torch.randn_like(images)
    slightly, badly = (images + 0.05 * noise).clamp(0, 1), (images + 0.3 * noise).clamp(0, 1)
    assert torch.all(psnr(badly, images) < psnr(slightly, images))
    assert torch.all(ssim(badly, images) < ssim(slightly, images)) and torch.all(ssim(slightly, images) < 1)
    flat_a, flat_b = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.6)
    assert psnr(flat_a, flat_b).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    c1 = 0.01**2  # only SSIM's luminance term differs from 1 for flat images
    assert ssim(flat_a, flat_b).item() == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), abs=1e-5)


def test_split_is_fixed_and_phrasings_are_disjoint():
    split = digit_split()
    assert len(split.train_images) + len(split.heldout_images) == 1797
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def test_classifier_recognises_heldout_real_digits():
    split = digit_split()
    model = train_classifier(split)
    assert accuracy(model, split.heldout_images, split.heldout_labels) >= 0.95


def test_micro_zoo_builds_deterministically_serves_and_evaluates(tmp_path):
    first, second = open_manifest(tmp_path / "a" / "artifacts"), open_manifest(tmp_path / "b" / "artifacts")
    for manifests in (first, second):
        assert build_image_zoo(manifests, MICRO)
    assert build_placeholder_zoo(first, if_missing=True)  # what `make serve` adds: the chat stand-in
    weights = "zoo/digits-dit/transformer/diffusion_pytorch_model.safetensors"
    assert sha256_file(first.file(weights)) == sha256_file(second.file(weights))
    assert not build_image_zoo(first, MICRO, if_missing=True)
    built = load_manifest(first.path)
    assert [m.name for m in built.image] == ["digits-dit", "digits-pixart"]
    assert not any(m.placeholder for m in built.image)
    assert (tmp_path / "a" / "runs" / "zoo" / "digits-pixart" / "loss.png").is_file()

    with TestClient(create_app(make_settings(first.path), load_in_background=False)) as c:
        body = c.post("/generate-image", json={"model": "digits-pixart", "prompt": "a handwritten seven",
                                              "seed": 3, "steps": 4}).json()
        assert body["placeholder"] is False and len(body["images"]) == 1

    protocol = Protocol(per_class=2, samplers=(("ddim", 4, "baseline"), ("dpm++", 2, "baseline"),
                                               ("ddim", 4, "cache:taylorseer-2"), ("ddim", 4, "cache:pab-2"),
                                               ("ddim", 4, "cache:fastercache-2"),
                                               ("ddim", 4, "cache:dbcache-F1B0W1-0.9")),
                        reference=("ddim", 4, "baseline"), ilf_caches=("fbc-0.1",),
                        latency_rounds_batch1=1, latency_batch=4, latency_rounds=2, bootstrap_rounds=10)
    train_ilf(first, "digits-pixart", MICRO_ILF)  # a model with an ILF module also gets ILF, and ILF with a cache
    report = run_image_eval(first, tmp_path / "eval", protocol)
    saved = json.loads((tmp_path / "eval" / "images.json").read_text())
    assert saved["models"].keys() == {"digits-dit", "digits-pixart"}
    rows = saved["models"]["digits-dit"]
    assert [r["sampler"] for r in rows] == ["ddim-4", "dpm++-2", "taylorseer-2@ddim-4", "pab-2@ddim-4",
                                            "fastercache-2@ddim-4", "dbcache-F1B0W1-0.9@ddim-4"]
    for cached in rows[2:]:  # each cache skips work, so its images leave the reference's
        assert cached["block_evaluations"] is None and cached["psnr_vs_reference_db"] < PSNR_CAP_DB
        assert cached["seconds_per_image_batch4"] > 0 and cached["speedup_batch4"] > 0
        low, high = cached["speedup_batch4_range"]  # the median of the two rounds' ratios, between them
        assert len(cached["seconds_per_image_batch4_rounds"]) == 2 and low <= cached["speedup_batch4"] <= high
    assert rows[0]["speedup_batch4_range"] == [1.0, 1.0]  # the reference against itself, round by round
    assert rows[0]["psnr_vs_reference_db"] == PSNR_CAP_DB and rows[0]["ssim_vs_reference"] == pytest.approx(1.0)
    assert rows[1]["psnr_vs_reference_db"] < PSNR_CAP_DB
    ilf_rows = saved["models"]["digits-pixart"][len(rows):]
    assert [(r["sampler"], r["mode"]) for r in ilf_rows] == [("ilf-2", "ilf"), ("fbc-0.1@ilf-2", "ilf+cache:fbc-0.1")]
    # FirstBlockCache's skips are counted: at most ILF's own blocks
    assert 0 < ilf_rows[1]["block_evaluations"] <= ilf_rows[0]["block_evaluations"]
    assert ilf_rows[1]["seconds_per_image_batch4"] > 0
    lo, hi = rows[1]["digit_fid_ci95"]
    assert 0 <= rows[1]["accuracy"] <= 1 and np.isfinite(rows[1]["digit_fid"]) and lo <= hi
    assert report["real_vs_real"]["images"] == 20
    for name in ("digits-dit.png", "digits-pixart.png", "digits-dit-frontier.png"):
        assert (tmp_path / "eval" / name).is_file()


def test_the_frontier_judgement_names_what_is_faster_and_more_faithful():
    from training.eval.images import judge_against_frontier

    def row(name, speedup, db, accuracy=1.0, fid=50.0):
        return {"sampler": name, "speedup_batch16": speedup, "psnr_vs_reference_db": db, "accuracy": accuracy,
                "digit_fid": fid, "digit_fid_ci95": [40.0, 70.0]}

    rows = [row("ddim-20", 1.0, 100.0), row("cache", 2.5, 36.0), row("ilf", 2.0, 35.0),
            row("ilf+cache", 3.0, 30.0, accuracy=0.985), row("ddim-8", 2.7, 32.0, fid=75.0)]
    judge_against_frontier(rows, rows[0], 16)
    assert {r["sampler"]: r["dominated_by"] for r in rows} == {
        "ddim-20": [], "cache": [], "ilf": ["cache"], "ilf+cache": [], "ddim-8": []}
    assert [r["keeps_quality"] for r in rows] == [True, True, True, False, False]
