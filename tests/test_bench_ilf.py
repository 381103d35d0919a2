"""The real-scale ILF timing script, on shapes small enough to run in seconds."""

import json

import pytest

from bench.ilf_real_scale import main, scaled_loop


def test_zoo_loop_scales_to_the_backbone_depth():
    assert scaled_loop(12) == (2, 3)
    assert scaled_loop(28) == (5, 6)  # the DiT-XL/2 and PixArt depth: a 2-block loop, as on the zoo


class BlockClock:
    """A clock that advances one second per transformer block the sampler runs, whatever the
    machine: under it, a sampler's time is its block evaluations."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def tick(self, *_):
        self.now += 1.0


def test_bench_times_the_sampling_calls_and_reports_the_block_ratio(tmp_path, monkeypatch):
    """Regression guard of what the bench times: under a clock that counts the blocks each backbone
    and ILF module really run (forward hooks), every row's seconds are its sampler's block count."""
    import bench.ilf_real_scale as bench

    clock, real_build = BlockClock(), bench.build

    def counted_build(name, device, dtype):
        backbone = real_build(name, device, dtype)
        for block in [*backbone.transformer.transformer_blocks, backbone.ilf.feedback.block]:
            block.register_forward_pre_hook(clock.tick)
        return backbone

    monkeypatch.setattr(bench, "build", counted_build)
    monkeypatch.setattr(bench, "time", clock)
    out = tmp_path / "bench.json"
    rows = main(["--shapes", "tiny-dit", "tiny-pixart", "--ilf-steps", "8", "10", "--out", str(out)])
    assert [(r["shape"], r["ilf_steps"]) for r in rows] == [
        ("tiny-dit", 8), ("tiny-dit", 10), ("tiny-pixart", 8), ("tiny-pixart", 10)]
    for row in rows:
        loop = 2  # scaled_loop(6) == (1, 2)
        assert row["baseline_seconds"] == row["baseline_block_evaluations"] == 20 * 6
        assert row["ilf_seconds"] == row["ilf_block_evaluations"] == row["ilf_steps"] * (6 + loop + 1)
        assert row["speedup"] == pytest.approx(row["ideal_speedup"]) and row["speedup"] > 1
    assert json.loads(out.read_text())["rows"] == rows
