"""The ILF module: exact identity at s = 0, the looped forward, its artifact, and serving it."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.imaging.backbones import load_image_backbone
from server.imaging.ilf import FeedbackModule, ILFConfig, LoadedILF, ilf_enabled, load_ilf, save_ilf
from server.imaging.sampler import SampleJob, sample
from server.manifest import ArtifactResolver, ILFArtifact, load_manifest, write_manifest
from server.artifacts import ArtifactError, sha256_file
from tests.conftest import assert_error_shape, make_settings, zoo_manifest


def backbone_named(manifest_path, name):
    manifest = load_manifest(manifest_path)
    spec = next(m for m in manifest.image if m.name == name)
    return load_image_backbone(spec, ArtifactResolver(manifest_path.parent), "cpu")


def ilf_config(model, **overrides) -> ILFConfig:
    fields = dict(loop_start=1, loop_end=1, steps=3) | overrides
    return ILFConfig.for_transformer(model.transformer, fields.pop("backbone", model.name), **fields)


def model_inputs(backbone, batch=2):
    x = torch.randn(batch, backbone.latent_channels, 8 if "latent" in backbone.name else 16,
                    8 if "latent" in backbone.name else 16, generator=torch.Generator().manual_seed(0))
    conditions = [0, 1][:batch] if backbone.spec.kind == "dit" else ["the digit 1", "a handwritten two"][:batch]
    return x, torch.tensor(500), backbone.conditioning(conditions, guided=False)


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-dit-latent", "tiny-pixart"])
def test_untrained_feedback_reproduces_the_frozen_backbone_exactly(manifest_path, name):
    backbone = backbone_named(manifest_path, name)
    config = ilf_config(backbone)
    feedback = FeedbackModule.for_backbone(backbone.transformer, config)
    x, t, cond = model_inputs(backbone)
    with torch.no_grad():
        plain = backbone.predict(x, t, cond)
        with ilf_enabled(backbone.transformer, feedback, config):
            looped = backbone.predict(x, t, cond)
        assert torch.equal(plain, looped)

        torch.nn.init.normal_(feedback.scale, std=0.5)
        with ilf_enabled(backbone.transformer, feedback, config):
            changed = backbone.predict(x, t, cond)
    assert not torch.allclose(plain, changed)
    assert len(backbone.transformer.transformer_blocks) == config.num_blocks  # restored after the loop


def test_looped_forward_runs_the_loop_twice_and_the_feedback_block_once(manifest_path):
    backbone = backbone_named(manifest_path, "tiny-dit")
    config = ilf_config(backbone)
    feedback = FeedbackModule.for_backbone(backbone.transformer, config)
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, b in enumerate(backbone.transformer.transformer_blocks)]
    hooks.append(feedback.block.register_forward_hook(lambda *a: calls.append("FB")))
    x, t, cond = model_inputs(backbone)
    with torch.no_grad(), ilf_enabled(backbone.transformer, feedback, config):
        backbone.predict(x, t, cond)
    for h in hooks:
        h.remove()
    assert calls == [0, 1, "FB", 1]
    assert len(calls) == config.blocks_per_step


def test_loop_must_leave_block_zero_to_the_backbone():
    with pytest.raises(ValueError, match="must lie in"):
        ILFConfig(backbone="m", num_blocks=4, width=8, loop_start=0, loop_end=1, steps=4)


def test_artifact_round_trip_and_refusals(manifest_path, tmp_path):
    backbone = backbone_named(manifest_path, "tiny-dit")
    config = ilf_config(backbone)
    feedback = FeedbackModule.for_backbone(backbone.transformer, config)
    torch.nn.init.normal_(feedback.scale)
    save_ilf(tmp_path / "ilf.safetensors", feedback, config)

    loaded = load_ilf(tmp_path / "ilf.safetensors", backbone.transformer, "tiny-dit")
    assert loaded.config == config and torch.equal(loaded.feedback.scale, feedback.scale)
    assert not any(p.requires_grad for p in loaded.feedback.parameters())
    with pytest.raises(ArtifactError, match="trained for 'tiny-dit', not 'tiny-pixart'"):
        load_ilf(tmp_path / "ilf.safetensors", backbone.transformer, "tiny-pixart")
    pixart = backbone_named(manifest_path, "tiny-pixart")
    wrong = ilf_config(pixart, backbone="tiny-dit")
    save_ilf(tmp_path / "wrong.safetensors", FeedbackModule.for_backbone(pixart.transformer, wrong), wrong)
    with pytest.raises(ArtifactError, match="does not match tiny-dit"):
        load_ilf(tmp_path / "wrong.safetensors", backbone.transformer, "tiny-dit")


@pytest.fixture(scope="module")
def ilf_client(zoo_dir, manifest_path):
    """The tiny zoo with an ILF module (random, non-zero s) attached to tiny-dit."""
    path = zoo_dir / "weights_manifest_ilf.yaml"
    manifest = zoo_manifest(zoo_dir)
    dit = backbone_named(manifest_path, "tiny-dit")
    config = ilf_config(dit)
    feedback = FeedbackModule.for_backbone(dit.transformer, config)
    torch.nn.init.normal_(feedback.scale, std=0.3, generator=torch.Generator().manual_seed(0))
    artifact = zoo_dir / "artifacts" / "ilf" / "tiny-dit.safetensors"
    artifact.parent.mkdir(exist_ok=True)
    save_ilf(artifact, feedback, config)
    entry = ILFArtifact(path="artifacts/ilf/tiny-dit.safetensors", sha256=sha256_file(artifact), steps=3)
    image = [m.model_copy(update={"ilf": entry}) if m.name == "tiny-dit" else m for m in manifest.image]
    write_manifest(manifest.model_copy(update={"image": image}), path)
    with TestClient(create_app(make_settings(path), load_in_background=False)) as c:
        yield c


def test_ilf_is_the_default_mode_where_a_module_exists(ilf_client):
    body = ilf_client.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, "seed": 4}).json()
    assert body["mode"] == "ilf" and body["steps"] == 3
    assert body["block_evaluations"] == 3 * (2 + 1 + 1)  # steps x (N + L + 1)
    baseline = ilf_client.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, "seed": 4,
                                                        "mode": "baseline", "steps": 3}).json()
    assert baseline["mode"] == "baseline" and baseline["block_evaluations"] == 3 * 2
    assert baseline["images"] != body["images"]
    card = next(m for m in ilf_client.get("/v1/models").json()["data"] if m["id"] == "tiny-dit")
    assert card["details"]["ilf"] == {"steps": 3, "scheduler": "ddim", "blocks_per_step": 4}


def test_ilf_asked_for_an_untrained_schedule_is_a_clear_4xx(ilf_client):
    asked = {"model": "tiny-dit", "class_label": 2, "mode": "ilf"}
    error = assert_error_shape(ilf_client.post("/generate-image", json={**asked, "steps": 8}), 422, "steps")
    assert "trained for 3 steps" in error["message"]
    assert_error_shape(ilf_client.post("/generate-image", json={**asked, "scheduler": "dpm++"}), 422, "scheduler")


def test_without_a_mode_a_schedule_the_ilf_module_was_not_trained_for_is_served_by_the_baseline(ilf_client):
    for other in ({"steps": 8}, {"scheduler": "dpm++"}, {"steps": 8, "scheduler": "dpm++"}):
        body = ilf_client.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, **other}).json()
        assert body["mode"] == "baseline" and body["steps"] == other.get("steps", 4), body
    matching = ilf_client.post("/generate-image", json={"model": "tiny-dit", "class_label": 2, "steps": 3}).json()
    assert matching["mode"] == "ilf"


def test_tampered_ilf_artifact_is_refused_at_load(zoo_dir, ilf_client):
    manifest = load_manifest(zoo_dir / "weights_manifest_ilf.yaml")
    spec = next(m for m in manifest.image if m.name == "tiny-dit")
    bad = spec.model_copy(update={"ilf": spec.ilf.model_copy(update={"sha256": "1" * 64})})
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_image_backbone(bad, ArtifactResolver(zoo_dir), "cpu")


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-pixart"])
def test_threads_sampling_one_backbone_at_once_each_get_what_they_would_alone(manifest_path, name):
    """Two ILF modules and the plain backbone, sampled by three threads in lockstep (each waits for the
    others after every step, so their loops overlap): each image equals the same request run alone."""
    import threading
    from dataclasses import replace

    backbone = backbone_named(manifest_path, name)
    config = ilf_config(backbone)
    variants = {"baseline": backbone}
    for seed in (1, 2):
        feedback = FeedbackModule.for_backbone(backbone.transformer, config)
        torch.manual_seed(seed)
        torch.nn.init.normal_(feedback.scale, std=0.5)
        variants[f"ilf-{seed}"] = replace(backbone, ilf=LoadedILF(feedback.eval(), config))
    condition = 3 if backbone.spec.kind == "dit" else "the digit 3"
    size = backbone.native_size

    def job(key):
        return SampleJob([condition], [7], 3, 1.0, size, size, mode="baseline" if key == "baseline" else "ilf")

    alone = {key: sample(model, job(key)).images for key, model in variants.items()}
    barrier = threading.Barrier(len(variants), timeout=60)
    together, errors = {}, []

    def run(key):
        try:
            together[key] = sample(variants[key], job(key), progress=lambda done, steps: barrier.wait()).images
        except Exception as exc:  # reported below, not lost in the thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(key,)) for key in variants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for key in variants:
        torch.testing.assert_close(together[key], alone[key], atol=1e-6, rtol=0)
    assert (alone["ilf-1"] - alone["baseline"]).abs().max() > 1e-3  # the loops do change the image
    assert (alone["ilf-1"] - alone["ilf-2"]).abs().max() > 1e-3


class Leave(Exception):
    """A client that has gone, as the image worker's progress check raises it."""


@pytest.mark.parametrize("name,scheduler,mode", [("tiny-dit", "ddim", "ilf"), ("tiny-dit", "dpm++", "baseline"),
                                                 ("tiny-pixart", "ddim", "ilf")])
def test_a_batch_of_requests_gives_each_the_images_it_gets_alone_and_lets_each_leave(manifest_path, name,
                                                                                      scheduler, mode):
    """Jobs with their own seeds, conditions, image counts and guidance (unguided among guided) in one
    batch; one job leaves after its second step: the others go on, each within 1/255 of alone."""
    from dataclasses import replace

    from server.imaging.sampler import sample_batch

    backbone = backbone_named(manifest_path, name)
    config = ilf_config(backbone, steps=4, scheduler=scheduler)
    feedback = FeedbackModule.for_backbone(backbone.transformer, config)
    torch.nn.init.normal_(feedback.scale, std=0.5)
    backbone = replace(backbone, ilf=LoadedILF(feedback.eval(), config))
    conditions = [0, 1, 2, 3] if backbone.spec.kind == "dit" else ["the digit 0", "a one", "two", "a handwritten 3"]
    size = backbone.native_size
    jobs = [SampleJob([conditions[0]], [11], 4, 1.0, size, size, scheduler, mode),
            SampleJob([conditions[1]] * 2, [20, 21], 4, 3.0, size, size, scheduler, mode),
            SampleJob([conditions[2]], [30], 4, 2.0, size, size, scheduler, mode),
            SampleJob([conditions[3]], [40], 4, 5.0, size, size, scheduler, mode)]
    alone = [sample(backbone, job).images for job in jobs]

    def leave_after_two(done, steps):
        if done == 2:
            raise Leave()

    steps_seen = []
    results = sample_batch(backbone, jobs, [None, None, leave_after_two, lambda d, s: steps_seen.append(d)])
    assert isinstance(results[2], Leave)
    assert steps_seen == [1, 2, 3, 4]
    for i in (0, 1, 3):
        assert results[i].images.shape == alone[i].shape
        assert (results[i].images - alone[i]).abs().max() <= 1 / 255
    assert (alone[1][0] - alone[1][1]).abs().max() > 0.05  # the rows do differ: a mix-up would show
    with pytest.raises(ValueError, match="share mode"):
        sample_batch(backbone, [jobs[0], replace(jobs[1], steps=3)])
    everyone_leaves = sample_batch(backbone, jobs[:2], [leave_after_two, leave_after_two])
    assert all(isinstance(r, Leave) for r in everyone_leaves)


def test_a_module_serves_the_guidance_it_was_distilled_for():
    from dataclasses import replace

    from server.imaging.ilf import ILFConfig

    single = ILFConfig(backbone="m", num_blocks=4, width=8, loop_start=1, loop_end=2, steps=2, guidance_scale=1.5)
    assert single.serves_guidance(1.5) and not single.serves_guidance(2.0) and not single.serves_guidance(1.0)
    ranged = replace(single, guidance_range=(1.0, 3.0))
    assert ranged.serves_guidance(1.0) and ranged.serves_guidance(3.0) and not ranged.serves_guidance(3.1)
    assert replace(single, guidance_scale=None).serves_guidance(7.0)  # nothing recorded: not refused


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-pixart"])
def test_first_block_cache_on_ilf_skips_the_feedback_with_the_loop_it_skips(manifest_path, name):
    """ILF's schedule with diffusers' FirstBlockCache on top, as served: a cache that never skips
    changes no pixel; on a step where it skips the blocks after the first, the feedback block does not
    run either (run on the skipped loop's output, it would add its feedback to the cached result), and
    the image reports the blocks it ran. A row leaving the batch resets the cache (its residuals had
    the old rows); the hooks are gone after the batch."""
    from dataclasses import replace

    from server.imaging.sampler import sample_batch

    backbone = backbone_named(manifest_path, name)
    config = ilf_config(backbone)
    feedback = FeedbackModule.for_backbone(backbone.transformer, config)
    torch.manual_seed(0)
    torch.nn.init.normal_(feedback.scale, std=0.5)
    ilf = replace(backbone, ilf=LoadedILF(feedback.eval(), config))
    conditions = [3, 5] if backbone.spec.kind == "dit" else ["the digit 3", "a handwritten five"]
    job = SampleJob(conditions, [7, 8], 4, 2.0, backbone.native_size, backbone.native_size, mode="ilf")
    plain = sample(ilf, job)

    feedback_calls = []
    hook = feedback.block.register_forward_hook(lambda *a: feedback_calls.append(1))
    never_skipping = sample(ilf, replace(job, first_block_cache=1e-9))
    assert torch.equal(never_skipping.images, plain.images) and len(feedback_calls) == 4
    assert never_skipping.block_evaluations == plain.block_evaluations == 4 * config.blocks_per_step
    feedback_calls.clear()
    skipping = sample(ilf, replace(job, first_block_cache=1000.0))  # every step after the first is skipped
    hook.remove()
    assert len(feedback_calls) == 1 and skipping.block_evaluations == config.blocks_per_step + 3
    assert torch.isfinite(skipping.images).all() and not torch.allclose(skipping.images, plain.images, atol=1e-3)
    assert torch.equal(sample(ilf, job).images, plain.images)  # no hook left behind

    def leave_at_step_2(done, steps):
        if done == 2:
            raise RuntimeError("client gone")

    alone = [replace(job, conditions=[c], seeds=[s], first_block_cache=1000.0) for c, s in zip(conditions, job.seeds)]
    stays, left = sample_batch(ilf, alone, [None, leave_at_step_2])
    assert isinstance(left, RuntimeError) and stays.images.shape[0] == 1 and torch.isfinite(stays.images).all()
