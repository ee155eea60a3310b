"""The deployed worker loop end to end: `python handler.py` with RunPod's JobScaler,
talking to a loopback stand-in for RunPod's job queue."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.runpod_standin import RunPodStandIn

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = base64.b64encode((ROOT / "assets" / "sample.png").read_bytes()).decode()
HAT = base64.b64encode((ROOT / "assets" / "sample_hat.png").read_bytes()).decode()
PROMPTS = ["make the sky pink", "add snow on the mountain", "turn it into a watercolor painting of a quiet valley",
           "a hat", "make the sun larger and much brighter", "night time"]  # fmt: skip


@pytest.fixture
def standin():
    server = RunPodStandIn()
    yield server
    server.close()


def good_job(i: int, seed: int | None = None, width: int = 64) -> dict:
    return {"id": f"good-{i}", "input": {"prompt": PROMPTS[i % len(PROMPTS)], "images": [SAMPLE, HAT], "width": width,
            "height": 64, "seed": 1000 + i if seed is None else seed, "num_inference_steps": 4}}  # fmt: skip


def start_worker(standin: RunPodStandIn, tiny_env, log_path: Path, **extra: str) -> subprocess.Popen:
    env = {**os.environ, **tiny_env(**extra), **standin.env(), "PYTHONUNBUFFERED": "1"}
    # The log goes to a file: RunPod's debug log is large, and an unread pipe would stall the worker.
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the worker did not exit after SIGTERM:\n" + log_path.read_text()[-4000:])
    return proc.returncode, log_path.read_text()


def serve_jobs(standin: RunPodStandIn, tiny_env, tmp_path: Path, jobs: list[dict], **extra: str) -> str:
    """Run `jobs` through a worker started as RunPod starts it, then SIGTERM it: each job is
    answered exactly once and the worker exits 0. The worker's log."""
    standin.add_jobs(jobs)
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, **extra)
    try:
        finished = standin.wait_for_results(len(jobs), timeout=240)
    finally:
        code, output = stop_worker(proc, log_path)
    assert finished and code == 0, output[-4000:]
    assert sorted(standin.results) == sorted(job["id"] for job in jobs)
    assert all(len(answers) == 1 for answers in standin.results.values())
    return output


def pixels(result: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["output"]["output_image_base64"])))).astype(int)


def test_concurrent_jobs_share_gpu_batches_each_answered_once(standin, tiny_env, tmp_path):
    originals = [good_job(i, width=64 if i % 2 else 96) for i in range(16)]
    # The same input and seed again, queued last, so that they run in other batches.
    repeats = [dict(originals[i], id=f"repeat-{i}") for i in (0, 1, 2, 3)]
    bad = [
        {"id": "bad-field", "input": {"promt": "typo", "images": [SAMPLE]}},
        {"id": "bad-base64", "input": {"prompt": "x", "image_base64": "%%%"}},
        {"id": "bad-steps", "input": {"prompt": "x", "images": [SAMPLE], "num_inference_steps": 0}},
        {"id": "bad-input", "input": "just a string"},
    ]
    jobs = originals[:8] + bad[:2] + originals[8:] + bad[2:] + repeats
    standin.add_jobs(jobs)
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, MAX_BATCH_SIZE="4", MAX_CONCURRENCY="8", BATCH_WAIT_MS="300")
    try:
        finished = standin.wait_for_results(len(jobs), timeout=240)
        time.sleep(1.0)  # any second answer would arrive now
    finally:
        code, output = stop_worker(proc, log_path)
    assert finished, f"only {len(standin.results)} of {len(jobs)} answered:\n{output[-4000:]}"
    assert code == 0, output[-4000:]

    # Every job answered exactly once.
    assert sorted(standin.results) == sorted(job["id"] for job in jobs)
    assert all(len(answers) == 1 for answers in standin.results.values())
    results = {job_id: answers[0] for job_id, answers in standin.results.items()}

    # Bad jobs fail alone, each with its sentence; every good job has an image.
    assert results["bad-field"]["error"].startswith("Unknown input field 'promt'")
    assert "valid base64" in results["bad-base64"]["error"]
    assert "'num_inference_steps' must be a whole number from 1 to 100" in results["bad-steps"]["error"]
    assert results["bad-input"]["error"].startswith("'input' must be a JSON object")
    good = {k: v for k, v in results.items() if not k.startswith("bad")}
    assert all("error" not in r and r["output"]["output_image_base64"] for r in good.values())

    # Real batching happened, and the response says so.
    sizes = [r["output"]["batch_size"] for r in good.values()]
    assert max(sizes) > 1, sizes
    assert all(1 <= s <= 4 for s in sizes)

    # The same input and seed gives the same pixels whatever batch it ran in (float32
    # sums in another order may move a value across a rounding boundary: at most 1 level).
    for i in (0, 1, 2, 3):
        first, again = results[f"good-{i}"], results[f"repeat-{i}"]
        assert first["output"]["seed"] == again["output"]["seed"] == 1000 + i
        difference = np.abs(pixels(first) - pixels(again))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.99

    # Progress reached RunPod, and the heartbeat ran.
    assert any(update and update.get("total_steps") == 4 for updates in standin.progress.values() for update in updates)
    assert standin.pings > 0
    assert "batch of" in output and "images, key" in output


def test_sigterm_finishes_taken_jobs_takes_no_more_and_exits_zero(standin, tiny_env, tmp_path):
    jobs = [good_job(i) for i in range(24)]
    standin.add_jobs(jobs)
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, MAX_BATCH_SIZE="2", MAX_CONCURRENCY="4", BATCH_WAIT_MS="50")
    assert standin.wait_for_results(1, timeout=180), "no job finished"
    code, output = stop_worker(proc, log_path)
    assert code == 0, output[-4000:]
    with standin.lock:
        taken, answered, left = list(standin.taken), dict(standin.results), len(standin.queue)
    assert sorted(answered) == sorted(taken), "a job taken before SIGTERM was not answered"
    assert all(len(answers) == 1 and "output" in answers[0] for answers in answered.values())
    assert left == len(jobs) - len(taken) > 0, "the worker should stop taking jobs on SIGTERM"
    # Nothing of the worker outlives it: the SDK's heartbeat process (a ping a second here) stops too.
    assert standin.pings > 0
    pings = standin.pings
    time.sleep(2.5)
    assert standin.pings == pings, "a heartbeat process outlived the worker"


def test_a_job_stopped_by_runpod_while_queued_never_reaches_the_gpu(standin, tiny_env, tmp_path):
    slow = {"id": "slow", "input": {"prompt": "busy", "images": [SAMPLE], "width": 384, "height": 384, "seed": 1,
                                    "num_inference_steps": 40}}  # fmt: skip
    victim = dict(good_job(1), id="victim")
    after = dict(good_job(2), id="after")
    standin.add_jobs([slow])
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, MAX_BATCH_SIZE="1", MAX_CONCURRENCY="3", BATCH_WAIT_MS="0")
    try:
        deadline = time.monotonic() + 120
        while not standin.progress.get("slow") and time.monotonic() < deadline:
            time.sleep(0.05)
        # Queued only once the slow job holds the GPU: jobs taken together may reach it in either order.
        standin.add_jobs([victim, after])
        while "victim" not in standin.taken and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the SDK has made it a task (a stop for a job without one is dropped)
        standin.stop("victim")  # RunPod cancels it while the slow job holds the GPU
        finished = standin.wait_for_results(2, timeout=180)
        time.sleep(1.5)
    finally:
        code, output = stop_worker(proc, log_path)
    assert finished and code == 0, output[-4000:]
    assert standin.results["slow"][0]["output"]["timings_ms"]["denoise"] > 2000  # it held the GPU long enough
    assert sorted(standin.results) == ["after", "slow"]
    assert "victim" not in standin.progress  # it never ran a denoising step
    assert "Stopping job." in output


def test_a_job_holding_a_huge_integer_does_not_lose_the_jobs_taken_with_it(standin, tiny_env, tmp_path):
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # the stand-in (this process) must be able to send it
    huge = {"id": "huge", "input": {**good_job(0)["input"], "seed": int("9" * 5000)}}
    standin.add_jobs([good_job(1), huge, good_job(2)])
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, MAX_CONCURRENCY="3", BATCH_WAIT_MS="0")
    try:
        finished = standin.wait_for_results(3, timeout=180)
    finally:
        code, output = stop_worker(proc, log_path)
        sys.set_int_max_str_digits(limit)
    assert finished and code == 0, output[-4000:]
    assert sorted(standin.results) == ["good-1", "good-2", "huge"]  # taken together, each answered once
    assert all(len(answers) == 1 for answers in standin.results.values())
    assert standin.results["huge"][0]["error"] == (
        "Input field 'seed' must be a whole number from 0 to 4294967295; got an integer of 5000 digits."
    )
    assert all("output" in standin.results[i][0] for i in ("good-1", "good-2"))


def test_lora_jobs_through_the_sdk_loop_get_the_same_pixels_whatever_ran_beside_them(standin, tiny_env, tmp_path,
                                                                                   base_holder):  # fmt: skip
    from tests.image_server import ImageServer
    from tests.loras.test_loras import low_rank, written

    server = ImageServer()
    pipe = base_holder.get().pipe
    server.serve_bytes("/one.safetensors", written(low_rank(pipe, seed=21), "lightx2v"))
    server.serve_bytes("/two.safetensors", written(low_rank(pipe, seed=22, kind=".img_mlp."), "comfyui"))
    one = [{"path": server.url("/one.safetensors"), "scale": 2.0}]
    both = [{"path": server.url("/two.safetensors"), "scale": 3.0}, one[0]]

    def lora_job(name: str, loras) -> dict:
        job = good_job(0, seed=77)
        return {"id": name, "input": {**job["input"], **({"loras": loras} if loras else {})}}

    jobs = [lora_job("plain-0", None), lora_job("one-0", one), lora_job("both-0", both), lora_job("plain-1", None),
            lora_job("one-1", one), lora_job("both-1", both)]  # fmt: skip
    standin.add_jobs(jobs)
    log_path = tmp_path / "worker.log"
    proc = start_worker(standin, tiny_env, log_path, MAX_CONCURRENCY="3", BATCH_WAIT_MS="100",
                        ALLOW_PRIVATE_IMAGE_URLS="true", MODEL_DIR=str(tmp_path / "models"))  # fmt: skip
    try:
        finished = standin.wait_for_results(len(jobs), timeout=240)
    finally:
        code, output = stop_worker(proc, log_path)
        server.close()
    assert finished and code == 0, output[-4000:]
    results = {name: standin.results[name][0] for name in standin.results}
    assert all(len(answers) == 1 for answers in standin.results.values())
    for kind in ("plain", "one", "both"):
        assert np.array_equal(pixels(results[f"{kind}-0"]), pixels(results[f"{kind}-1"])), kind
    assert not np.array_equal(pixels(results["one-0"]), pixels(results["plain-0"]))
    assert not np.array_equal(pixels(results["both-0"]), pixels(results["one-0"]))
    assert server.hits.count("/one.safetensors") == 1  # fetched once for four jobs
