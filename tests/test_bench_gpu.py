"""bench/gpu.sh, the prepared run for a GPU's minutes, end to end on the CPU and tiny artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_prepared_gpu_run_runs_every_bench_and_sets_each_figure_beside_its_bound(manifest_path, tmp_path):
    env = os.environ | {"DEVICE": "cpu", "QUICK": "1", "ROOT": str(manifest_path.parent), "OUT": str(tmp_path),
                        "IMAGE_MODEL": "tiny-dit", "PY": sys.executable}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cpu" and all(report["parts"].values()), report["parts"]
    assert report["copy_bandwidth_bytes_per_s"] > 1e8
    figures = {row["figure"]: row for row in report["rows"]}
    decode = [row for name, row in figures.items() if name.startswith("decode at batch 1")]
    assert len(decode) == 2 and decode[0]["weight_bytes"] > decode[1]["weight_bytes"]  # float, then NF4
    for row in decode:
        assert row["bound"] == pytest.approx(report["copy_bandwidth_bytes_per_s"] / row["weight_bytes"])
        assert row["of_bound"] == pytest.approx(row["value"] / row["bound"])
    assert any(name.startswith("chat engine") and row["bound"] for name, row in figures.items())
    ilf = [row for name, row in figures.items() if name.startswith("ILF-")]
    assert len(ilf) == 8 and all(row["bound"] > 1 for row in ilf)  # 2 shapes x 2 batches x 2 ILF step counts
    assert any(name.startswith("images baseline") for name in figures)
    assert "of bound" in run.stdout
