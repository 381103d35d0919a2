"""The yardstick's cache rows: cache-dit's DBCache on the backbone itself, against diffusers' FirstBlockCache."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.imaging.sampler import SampleJob, sample
from tests.test_ilf import backbone_named
from training.eval.cache_dit import dbcache


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-pixart"])
def test_dbcache_with_one_warm_up_step_and_no_tail_is_first_block_cache_and_leaves_no_trace(manifest_path, name):
    backbone = backbone_named(manifest_path, name)
    conditions = [3, 5] if backbone.spec.kind == "dit" else ["the digit 3", "a handwritten five"]
    job = SampleJob(conditions, [7, 8], 6, 2.0, backbone.native_size, backbone.native_size)
    keys = set(backbone.transformer.state_dict())
    plain = sample(backbone, job).images
    first_block = sample(backbone, replace(job, first_block_cache=0.5)).images
    assert not torch.allclose(first_block, plain, atol=1e-3)  # it skipped steps
    for _ in range(2):  # a second batch starts afresh
        with dbcache(backbone, "F1B0W1-0.5", job.steps) as step_context:
            db = sample(backbone, job, step_context).images
        assert torch.allclose(db, first_block, atol=1e-5)
    with dbcache(backbone, "F1B0-0", job.steps) as step_context:  # threshold 0: every step computes
        assert torch.allclose(sample(backbone, job, step_context).images, plain, atol=1e-5)
    assert set(backbone.transformer.state_dict()) == keys and torch.equal(sample(backbone, job).images, plain)
    with pytest.raises(ValueError, match="exceeds"):
        with dbcache(backbone, "F9B9-0.1", job.steps):
            pass
