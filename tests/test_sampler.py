"""The denoising loop against an analytic model: with the exact noise predictor of a point-mass
data distribution, DDIM and DPM-Solver++ must land on that point, and guidance must extrapolate."""

from __future__ import annotations

import pytest
import torch
from types import SimpleNamespace

from server.imaging.backbones import ImageBackbone
from server.imaging.sampler import SampleJob, initial_noise, make_scheduler, sample
from server.manifest import ImageModel, Source

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
             "prediction_type": "epsilon", "clip_sample": True, "set_alpha_to_one": False}


class PointMassEpsilon(torch.nn.Module):
    """eps(x_t, t) for data that is one constant image: x0 = target[class] exactly."""

    def __init__(self, targets: list[float]):
        super().__init__()
        self.targets = targets
        self.alphas_cumprod = make_scheduler("ddim", SCHEDULER).alphas_cumprod
        self.transformer_blocks = torch.nn.ModuleList([torch.nn.Identity()] * 3)
        self.config = SimpleNamespace(in_channels=1, patch_size=2, sample_size=8, num_embeds_ada_norm=len(targets) - 1)

    def forward(self, x, timestep, class_labels, return_dict=False):
        abar = self.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1)
        x0 = torch.tensor(self.targets)[class_labels].view(-1, 1, 1, 1)
        return ((x - abar.sqrt() * x0) / (1 - abar).sqrt(),)


def backbone(targets) -> ImageBackbone:
    spec = ImageModel(name="analytic", kind="dit", source=Source(path="unused"))
    return ImageBackbone(spec, PointMassEpsilon(targets), SCHEDULER, None, None, "cpu", torch.float32)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_sampler_lands_on_the_data_point(scheduler):
    # class 0 -> 0.2, class 1 -> -0.6; the last entry is the CFG null class
    model = backbone([0.2, -0.6, 0.0])
    job = SampleJob(conditions=[0, 1], seeds=[1, 2], steps=10, guidance_scale=1.0, height=8, width=8,
                    scheduler=scheduler)
    result = sample(model, job)
    expected = torch.tensor([0.2, -0.6]).view(2, 1, 1, 1).add(1).div(2).expand_as(result.images)
    torch.testing.assert_close(result.images, expected, atol=2e-2, rtol=0)
    assert result.steps == 10 and result.block_evaluations == 30


def test_guidance_extrapolates_from_the_null_condition():
    model = backbone([0.2, 0.0])  # cond -> 0.2, null -> 0.0
    job = SampleJob(conditions=[0], seeds=[3], steps=20, guidance_scale=2.0, height=8, width=8)
    pixels = sample(model, job).images * 2 - 1
    torch.testing.assert_close(pixels, torch.full_like(pixels, 0.4), atol=2e-2, rtol=0)


def test_noise_depends_only_on_each_images_seed():
    model = backbone([0.0, 0.0])
    a = initial_noise(model, SampleJob([0, 0], [7, 8], 1, 1.0, 8, 8))
    b = initial_noise(model, SampleJob([0], [8], 1, 1.0, 8, 8))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
