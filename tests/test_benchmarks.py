"""The GPU benchmark script runs end to end on the tiny model (its `--tiny` smoke mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_speed_smoke_run_reports_both_tables(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--tiny", "--scenarios", "lightning1024",
         "--variants", "eager-alone", "--warm-passes", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert [(r["scenario"], r["variant"]) for r in rows] == [("lightning1024", "stock"), ("lightning1024", "eager-alone")]
    mine = rows[1]
    assert mine["mean_batch"] == 1 and mine["images_per_s"] > 0
    assert mine["rel_error_vs_eager"] == 0.0  # the same engine, eager, on the same weights
    assert set(mine["stage_ms"]) == {"encode", "denoise", "decode"} and mine["stage_ms"]["denoise"] > 0
    assert "| lightning1024 | eager-alone |" in run.stdout
    assert "ms per transformer forward" in run.stdout


def test_gpu_speed_refuses_an_order_that_would_mislabel_variants():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--tiny", "--variants", "compiled,eager"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "list variants in this order" in run.stderr
