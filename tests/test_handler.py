"""The worker as users run it: `handler.py --test_input`, `test_input.json`, `--rp_serve_api`."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from config import Settings
from qwen_edit_worker.service import EditService

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = base64.b64encode((ROOT / "assets" / "sample.png").read_bytes()).decode()
HAT = base64.b64encode((ROOT / "assets" / "sample_hat.png").read_bytes()).decode()


def worker_env(tiny_env, **extra) -> dict[str, str]:
    return {**os.environ, **tiny_env(**extra), "PYTHONUNBUFFERED": "1", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"}


def run_handler(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "handler.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_test_input_with_two_images_returns_an_image_and_echoes_the_seed(tiny_env, tmp_path):
    job = {"input": {"prompt": "put the hat on the hill", "image_base64": SAMPLE, "images": [HAT], "seed": 1234,
                     "num_inference_steps": 2, "width": 64, "height": 64}}  # fmt: skip
    done = run_handler(["--test_input", json.dumps(job)], worker_env(tiny_env, SAVE_OUTPUT_DIR=str(tmp_path)))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "'seed': 1234" in log and "'batch_size': 1" in log and "'lightning_enabled': False" in log
    assert "Unable to import `torchao`" not in log  # known harmless, silenced at its source (`library_logs`)
    saved = tmp_path / "local_test-0.png"
    assert Image.open(saved).size == (64, 64)


def test_bundled_test_input_json_runs_with_lightning(tiny_env, tmp_path):
    done = run_handler([], worker_env(tiny_env, USE_LIGHTNING_LORA="true", SAVE_OUTPUT_DIR=str(tmp_path)))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "Using test_input.json as job input." in log
    assert "'seed': 42" in log and "'lightning_enabled': True" in log
    assert (tmp_path / "local_test-0.png").exists()


def test_bad_input_fails_the_local_job_with_the_sentence(tiny_env):
    done = run_handler(["--test_input", json.dumps({"input": {"promt": "x"}})], worker_env(tiny_env))
    assert done.returncode == 1
    assert "Unknown input field 'promt'" in done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_api(tiny_env, tmp_path_factory):
    """`handler.py --rp_serve_api` on a free port, images from loopback allowed: its URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("local-api") / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port)],
            cwd=ROOT, env=worker_env(tiny_env, ALLOW_PRIVATE_IMAGE_URLS="true"), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0  # SIGTERM ends the local API cleanly, not by the signal (-15)
    assert "stopped before the worker loop started" not in log_path.read_text()  # it served jobs


def test_rp_serve_api_answers_runsync(local_api):
    job = {"input": {"prompt": "x", "image_base64": SAMPLE, "seed": 7, "num_inference_steps": 1, "output_format": "jpeg"}}
    body = None
    deadline = time.monotonic() + 180
    while body is None and time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{local_api}/runsync", data=json.dumps(job).encode(),
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            body = json.loads(urllib.request.urlopen(request, timeout=60).read())
        except OSError:
            time.sleep(0.5)
    assert body is not None, "the local API never answered"
    output = body["output"]
    assert output["seed"] == 7 and output["output_format"] == "jpeg"
    assert decoded(output["output_image_base64"]).format == "JPEG"


def readme_python_client() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Calling the endpoint"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def test_the_readmes_python_client_works_against_the_local_api_server(local_api, tmp_path):
    """As written, but for the two example.com image URLs, served here from loopback."""
    from tests.image_server import ImageServer

    client = readme_python_client()
    images = ImageServer()
    images.serve_bytes("/person.jpg", base64.b64decode(SAMPLE))
    images.serve_bytes("/hat.png", base64.b64decode(HAT))
    client = client.replace("https://example.com/person.jpg", images.url("/person.jpg"))
    client = client.replace("https://example.com/hat.png", images.url("/hat.png"))
    try:
        done = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                              env={**os.environ, "ENDPOINT_URL": local_api})  # fmt: skip
    finally:
        images.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit-0.png", "edit-1.png"]


def test_service_answers_every_documented_field(tiny_settings, base_holder):
    async def scenario():
        service = EditService(tiny_settings, holder=base_holder)
        job = {"id": "j1", "input": {"prompt": "x", "images": [SAMPLE, HAT], "num_images": 2, "seed": 3,
                                      "num_inference_steps": 2, "width": 96, "height": 64, "output_format": "webp"}}  # fmt: skip
        good = await service.handle(job)
        bad = await service.handle({"id": "j2", "input": {"prompt": "x", "image_base64": "!!"}})
        service.batcher.close(5)
        return good, bad

    good, bad = asyncio.run(scenario())
    assert bad == {"error": "Input image 1 is neither an http(s) URL nor valid base64."}
    assert set(good) == {
        "images", "output_format", "seed", "prompt", "num_inference_steps", "true_cfg_scale",
        "lightning_enabled", "width", "height", "precision", "batch_size", "timings_ms", "warnings", "loras",
    }  # fmt: skip
    assert good["warnings"] == [] and good["loras"] == []
    assert len(good["images"]) == 2  # several images: the list alone, each image once
    assert good["images"][0] != good["images"][1]
    assert decoded(good["images"][1]).size == (96, 64)
    assert (good["seed"], good["num_inference_steps"], good["true_cfg_scale"]) == (3, 2, 4.0)
    assert (good["precision"], good["batch_size"], good["lightning_enabled"]) == ("fp32", 1, False)
    assert {"fetch", "encode", "denoise", "decode", "total"} <= set(good["timings_ms"])


def test_handler_module_is_an_async_runpod_entry(tiny_env, monkeypatch):
    for name, value in tiny_env(MAX_CONCURRENCY="6").items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("handler", None)
    import handler

    try:
        assert inspect.iscoroutinefunction(handler.handler)
        assert handler.concurrency_modifier(1) == handler.concurrency_modifier(3) == 6
        assert handler.SETTINGS == Settings.from_env(tiny_env(MAX_CONCURRENCY="6"))
    finally:
        sys.modules.pop("handler", None)


def test_a_lightning_job_asking_for_base_model_settings_is_warned(tiny_env, base_holder):
    lightning = Settings.from_env(tiny_env(USE_LIGHTNING_LORA="true"))

    async def scenario():
        service = EditService(lightning, holder=base_holder)  # the base weights stand in: the warnings are the point
        job = {"id": "w", "input": {"prompt": "x", "images": [SAMPLE], "num_inference_steps": 3, "true_cfg_scale": 4,
                                    "width": 64, "height": 64}}  # fmt: skip
        plain = {"id": "p", "input": {"prompt": "x", "images": [SAMPLE], "negative_prompt": "blurry", "width": 64,
                                      "height": 64, "true_cfg_scale": 0.5}}  # fmt: skip
        answers = await service.handle(job), await service.handle(plain)
        service.batcher.close(5)
        return answers

    warned, plain = asyncio.run(scenario())
    assert warned["warnings"] == [
        "num_inference_steps 3 ran the Lightning LoRA, which is distilled for 8 steps: other step counts run it off the "
        "schedule it learned (the 40-step base model needs USE_LIGHTNING_LORA=false on the endpoint).",
        "true_cfg_scale 4 ran classifier-free guidance on the Lightning LoRA, which is distilled without it: each step "
        "costs twice as much and images may over-saturate (use 1).",
    ]
    assert plain["num_inference_steps"] == 8 and plain["warnings"] == [
        "true_cfg_scale 0.5 is below 1, which turns guidance off: it ran as 1 would.",
        "negative_prompt was not used: it takes effect only when true_cfg_scale is above 1.",
    ]


def test_a_side_that_the_limits_move_off_the_inputs_aspect_is_warned(tiny_settings, base_holder):
    """`width: 272` alone on a 64x512 input (1:8) would need a height of 2176: the output is
    272x2048 (about 1:7.5), and the answer says so."""
    tall = io.BytesIO()
    Image.new("RGB", (64, 512), (200, 40, 40)).save(tall, format="PNG")
    tall_b64 = base64.b64encode(tall.getvalue()).decode()

    async def scenario():
        service = EditService(tiny_settings, holder=base_holder)
        base = {"prompt": "x", "images": [tall_b64], "num_inference_steps": 1}
        answers = [await service.handle({"id": "w", "input": {**base, "width": 272}}),
                   await service.handle({"id": "h", "input": {**base, "height": 1024}})]  # fmt: skip
        service.batcher.close(5)
        return answers

    moved, kept = asyncio.run(scenario())
    assert (moved["width"], moved["height"]) == (272, 2048)
    assert moved["warnings"] == [
        "height follows the last input image's aspect ratio (64x512), which with width 272 would be 2176 px, outside "
        "the 64-2048 px a side may have: the output is 272x2048, another aspect ratio (give both width and height to "
        "choose it)."
    ]
    assert (kept["width"], kept["height"], kept["warnings"]) == (128, 1024, [])  # the aspect kept: nothing to say


@pytest.mark.parametrize("text", ["山" * 4000, "🙂" * 4000, "\u0301" * 4000], ids=["cjk", "emoji", "combining"])
def test_a_prompt_past_the_models_text_positions_is_refused_before_the_gpu(tiny_settings, base_holder, text):
    async def scenario():
        service = EditService(tiny_settings, holder=base_holder)
        ran = []
        service.engine.run_batch = lambda requests: ran.append(requests)
        answers = [await service.handle({"id": "long", "input": {"prompt": text, "images": [SAMPLE], "width": 64,
                                                                 "height": 64}}),  # fmt: skip
                   await service.handle({"id": "neg", "input": {"prompt": "x", "negative_prompt": text,
                                                                "true_cfg_scale": 4, "images": [SAMPLE]}})]  # fmt: skip
        service.batcher.close(5)
        return answers, ran

    (long_prompt, long_negative), ran = asyncio.run(scenario())
    assert re.fullmatch(r"Input field 'prompt' is too long: with the input images it takes \d+ text positions of "
                        r"the 4092 the model has at this output size; shorten it\.", long_prompt["error"]), long_prompt  # fmt: skip
    assert long_negative["error"].startswith("Input field 'negative_prompt' is too long")
    assert ran == []


def test_a_long_prompt_that_fits_is_edited(tiny_settings, base_holder):
    async def scenario():
        service = EditService(tiny_settings, holder=base_holder)
        answer = await service.handle({"id": "ok", "input": {"prompt": "山" * 1200, "images": [SAMPLE], "width": 64,
                                                             "height": 64, "num_inference_steps": 1}})  # fmt: skip
        service.batcher.close(5)
        return answer

    assert "output_image_base64" in asyncio.run(scenario())


def test_an_unexpected_failure_is_a_sentence_without_the_exception(tiny_settings, base_holder):
    async def scenario():
        service = EditService(tiny_settings, holder=base_holder)

        def broken(requests):
            raise KeyError("internal detail")

        service.engine.run_batch = broken
        answer = await service.handle({"id": "job-7", "input": {"prompt": "x", "images": [SAMPLE], "width": 64,
                                                                "height": 64}})  # fmt: skip
        service.batcher.close(5)
        return answer

    answer = asyncio.run(scenario())
    assert answer == {"error": "The edit failed inside the worker (logged with job id job-7); retry the job."}
