"""The real-scale ILF timing script, on shapes small enough to run in seconds."""

import json

import pytest

from bench.ilf_real_scale import main, scaled_loop


def test_zoo_loop_scales_to_the_backbone_depth():
    assert scaled_loop(12) == (2, 3)
    assert scaled_loop(28) == (5, 6)  # the DiT-XL/2 and PixArt depth: a 2-block loop, as on the zoo


def test_bench_times_baseline_and_ilf_and_reports_the_block_ratio(tmp_path):
    out = tmp_path / "bench.json"
    rows = main(["--shapes", "tiny-dit", "tiny-pixart", "--ilf-steps", "8", "10", "--out", str(out)])
    assert [(r["shape"], r["ilf_steps"]) for r in rows] == [
        ("tiny-dit", 8), ("tiny-dit", 10), ("tiny-pixart", 8), ("tiny-pixart", 10)]
    for row in rows:
        loop = 2  # scaled_loop(6) == (1, 2)
        assert row["baseline_block_evaluations"] == 20 * 6
        assert row["ilf_block_evaluations"] == row["ilf_steps"] * (6 + loop + 1)
        assert row["ideal_speedup"] == pytest.approx(120 / row["ilf_block_evaluations"])
        assert row["baseline_seconds"] > 0 and row["speedup"] == pytest.approx(
            row["baseline_seconds"] / row["ilf_seconds"])
    assert json.loads(out.read_text())["rows"] == rows
