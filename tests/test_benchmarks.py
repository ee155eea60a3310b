"""The GPU benchmark script runs end to end on the tiny model (its `--tiny` smoke mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """benchmarks/`name` with `args`, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_gpu_speed_smoke_run_reports_both_tables(tmp_path):
    run = run_script("gpu_speed.py", "--tiny", "--scenarios", "lightning1024", "--variants", "eager-alone",
                     "--warm-passes", "1", "--out", str(tmp_path), timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_speed.json").read_text())
    assert [(r["scenario"], r["variant"]) for r in rows] == [("lightning1024", "stock"), ("lightning1024", "eager-alone")]
    mine = rows[1]
    assert mine["mean_batch"] == 1 and mine["images_per_s"] > 0
    assert mine["rel_error_vs_eager"] == 0.0  # the same engine, eager, on the same weights
    assert set(mine["stage_ms"]) == {"encode", "denoise", "denoise_max", "decode"} and mine["stage_ms"]["denoise"] > 0
    assert mine["stage_ms"]["denoise_max"] >= mine["stage_ms"]["denoise"]  # the longest job's, to see a stall
    assert "| lightning1024 | eager-alone |" in run.stdout
    assert "ms per transformer forward" in run.stdout
    assert "eager-alone lightning1024: each job (by end): [" in run.stdout and " wait " in run.stdout


def test_gpu_speed_refuses_an_order_that_would_mislabel_variants():
    run = run_script("gpu_speed.py", "--tiny", "--variants", "compiled,eager", timeout=120)
    assert run.returncode == 2
    assert "list variants in this order" in run.stderr


def test_profile_mode_splits_a_forward_into_kinds_and_rates(tmp_path):
    run = run_script("gpu_speed.py", "--tiny", "--profile", "bf16", "--profile-text", "7", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "forward_profile.json").read_text())["bf16"]
    assert summary["ms"]["matmul"] > 0 and summary["ms"]["attention"] > 0
    assert abs(sum(summary["ms"].values()) - summary["ms_per_forward"]) < 1e-6
    assert summary["tflops"]["matmul"] > 0 and summary["tokens"] == 2 * 4 * 4 + 7
    assert "| matmul |" in run.stdout and "| top kernel | kind | ms per forward |" in run.stdout


def test_kernels_are_classified_by_name():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from forward_profile import classify

    assert classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128") == "attention"
    assert classify("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert classify("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT") == "matmul"
    assert classify("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "matmul"
    assert classify("triton_red_fused_abs_amax_clamp_0") == "quantization"
    assert classify("triton_poi_fused__to_copy_clamp_div_mul_reciprocal_float8") == "quantization"
    assert classify("triton_poi_fused_add_cat_mul_rsqrt_view_as_complex_2") == "other"
    assert classify("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    # Seen on an H100: inductor names a fused kernel after its consumer too.
    assert classify("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_16") == "quantization"
    assert classify("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_cat_ones_permute") == "other"
    assert classify("triton_tem_fused_addmm_0") == "matmul"
    assert classify("aten::addmm") == "matmul" and classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"


def test_context_latency_smoke_run_compares_one_gpu_with_the_ranks(tmp_path):
    """Two gloo ranks on the CPU stand in for two GPUs: the script runs and the images agree."""
    run = run_script("context_latency.py", "--tiny", "--gpus", "2", "--jobs", "1", "--dir", str(tmp_path))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| single |", "| context |"))]
    assert len(rows) == 2
    assert rows[1].split("|")[-2].strip() in ("0", "1")  # the largest pixel difference from one GPU's image


def test_check_lost_rank_smoke_run_sees_the_rank_go():
    """On gloo, which notices a lost peer by itself: the script's ranks, watch and report work."""
    run = run_script("check_lost_rank.py", "--cpu", timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASS: rank 1 exited (3); the watch saw it after" in run.stdout


@pytest.mark.parametrize("modes", ["single,threads", "processes"])
def test_replica_throughput_smoke_run_reports_one_device_and_each_replica_mode(tmp_path, modes):
    """CPU stand-ins for two GPUs: each mode serves the queue in a process of its own, and the
    table compares each with one device (its images too) where that ran. Replica processes are
    the slow mode (three processes importing torch): they run beside no other mode."""
    run = run_script("replica_throughput.py", "--tiny", "--gpus", "2", "--jobs", "4", "--modes", modes,
                     "--dir", str(tmp_path), timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith(("| single |", "| threads |", "| processes |"))]
    expected = {"single": "1", "threads": "2", "processes": "2"}
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [(mode, expected[mode]) for mode in modes.split(",")]
    assert all(float(row[4]) > 0 for row in rows)
    single = "single" in modes
    assert all(row[-2].strip() == ("0" if single else "-") for row in rows)  # the largest pixel difference from one device


def test_the_scale_up_run_hands_waiting_jobs_over_as_runpod_does_and_sums_them_up():
    """cold_start's `queueN` runs: at most MAX_CONCURRENCY jobs held at once, latency from the
    process's start, the longest denoise against the median (a compile on a job stands out)."""
    import asyncio

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cold_start

    class Service:  # the one method the run calls; the worker's own is exercised by the tests of the service
        held = most = 0

        async def handle(self, job):
            Service.held += 1
            Service.most = max(Service.most, Service.held)
            await asyncio.sleep(0.01)
            Service.held -= 1
            return {"batch_size": 1, "timings_ms": {"denoise": 9000.0 if job["id"] == "cold-0" else 2500.0}}

    answers = asyncio.run(cold_start.waiting_jobs(Service(), 7, concurrency=3))
    assert len(answers) == 7 and Service.most == 3
    summary = cold_start.queue_summary(answers)
    assert summary["jobs"] == 7 and summary["errors"] == 0 and summary["batch_sizes"] == [1] * 7
    assert summary["denoise_ms_longest"] == 9000.0 and summary["denoise_ms_steady"] == 2500.0
    assert summary["p50_s"] <= summary["p95_s"] <= summary["last_s"]
