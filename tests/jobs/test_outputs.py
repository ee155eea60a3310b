"""Delivering results: bucket uploads against a real S3 protocol server, and payload limits."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import time
import urllib.request

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from config import Settings
from qwen_edit_worker.service import EditService
from tests.test_handler import HAT, SAMPLE


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="edits")  # fmt: skip
    yield endpoint
    server.stop()


def handle(settings: Settings, holder, job_input: dict) -> dict:
    async def scenario():
        service = EditService(settings, holder=holder)
        try:
            return await service.handle({"id": "job-1", "input": job_input})
        finally:
            service.close()

    return asyncio.run(scenario())


JOB = {"prompt": "x", "images": [SAMPLE, HAT], "seed": 5, "num_inference_steps": 1, "width": 64, "height": 64}


def test_outputs_are_uploaded_and_returned_as_urls(tiny_env, base_holder, s3_endpoint):
    settings = Settings.from_env(tiny_env(BUCKET_ENDPOINT_URL=s3_endpoint, BUCKET_ACCESS_KEY_ID="test",
                                          BUCKET_SECRET_ACCESS_KEY="test", BUCKET_NAME="edits"))  # fmt: skip
    result = handle(settings, base_holder, {**JOB, "num_images": 2})
    assert "output_image_base64" not in result and "output_image_url" not in result
    urls = result["images"]
    assert len(urls) == 2
    assert all(url.startswith(f"{s3_endpoint}/edits/job-1/") and "X-Amz-Signature" in url for url in urls)
    downloaded = [Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=10).read())) for url in urls]
    assert [img.size for img in downloaded] == [(64, 64), (64, 64)]
    inline = handle(dataclasses.replace(settings, bucket_endpoint_url=""), base_holder, {**JOB, "num_images": 2})
    for url, b64 in zip(urls, inline["images"]):  # the same bytes as the inline answer
        assert urllib.request.urlopen(url, timeout=10).read() == base64.b64decode(b64)


def test_a_result_over_the_payload_limit_fails_with_the_remedies(tiny_env, base_holder):
    settings = Settings.from_env(tiny_env(MAX_RESPONSE_BYTES="100000"))
    # 2 x 160x160 png is at least 68 kB, under the limit: it is computed, and the encoded noise is larger.
    result = handle(settings, base_holder, {**JOB, "width": 160, "height": 160, "num_images": 2})
    message = result["error"]
    assert message.startswith("The result would be") and "timings_ms" not in result
    assert "over the 0.1 MB that RunPod delivers (MAX_RESPONSE_BYTES)" in message
    assert "BUCKET_ENDPOINT_URL" in message and "jpeg or webp" in message and "fewer images" in message
    small = handle(settings, base_holder, JOB)
    assert "error" not in small and small["output_image_base64"]


def test_one_image_is_sent_once_in_the_seed_workers_field(tiny_settings, base_holder):
    result = handle(tiny_settings, base_holder, {**JOB, "width": 256, "height": 256})
    image = base64.b64decode(result["output_image_base64"])
    assert "images" not in result and Image.open(io.BytesIO(image)).size == (256, 256)
    assert len(json.dumps(result)) < 1.05 * len(result["output_image_base64"])  # not twice the image


def test_a_result_that_cannot_fit_is_refused_before_the_gpu_runs(tiny_env, base_holder, monkeypatch):
    settings = Settings.from_env(tiny_env(MAX_RESPONSE_BYTES="1000000"))
    ran = []
    monkeypatch.setattr(EditService, "_run_batch", lambda self, lane, requests: ran.append(requests))
    # 4 x 512x512 png is at least 1.4 MB in base64, whatever the pixels.
    result = handle(settings, base_holder, {**JOB, "width": 512, "height": 512, "num_images": 4})
    assert result["error"] == (
        "4 png image(s) of 512x512 would be at least 1.4 MB, over the 1 MB that RunPod delivers (MAX_RESPONSE_BYTES); "
        "set BUCKET_ENDPOINT_URL with its credentials to receive URLs, or ask for output_format jpeg or webp, "
        "fewer images or a smaller size."
    )
    assert ran == []


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unusable_output_settings_stop_the_worker_at_start_without_showing_credentials(tiny_env, tmp_path, s3_endpoint):
    from config import ConfigError
    from qwen_edit_worker import startup_checks

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    bucket = dict(BUCKET_ACCESS_KEY_ID="test", BUCKET_SECRET_ACCESS_KEY="s3cr3t-key", BUCKET_NAME="edits")
    closed = f"http://admin:pa55word@127.0.0.1:{_closed_port()}"
    cases = {
        "SAVE_OUTPUT_DIR 'PATH' cannot be written": {"SAVE_OUTPUT_DIR": str(a_file / "sub")},
        "BUCKET_ENDPOINT_URL must be an http or https URL; got 'ftp://": {**bucket, "BUCKET_ENDPOINT_URL": "ftp://x:pa55word@host/"},
        f"BUCKET_ENDPOINT_URL http://127.0.0.1:{closed.rsplit(':', 1)[1]} could not be reached.": {
            **bucket, "BUCKET_ENDPOINT_URL": closed},
        f"BUCKET_ENDPOINT_URL {s3_endpoint} has no bucket 'missing'.": {
            **bucket, "BUCKET_ENDPOINT_URL": s3_endpoint, "BUCKET_NAME": "missing"},
        f"BUCKET_ENDPOINT_URL {s3_endpoint} has no bucket '{time.strftime('%m-%y')}' (BUCKET_NAME is not set: runpod's "
        "uploader then names it after the month, MM-YY).": {**bucket, "BUCKET_ENDPOINT_URL": s3_endpoint, "BUCKET_NAME": ""},
        "BUCKET_ENDPOINT_URL is set but BUCKET_ACCESS_KEY_ID or BUCKET_SECRET_ACCESS_KEY is not": {
            "BUCKET_ENDPOINT_URL": s3_endpoint},
    }  # fmt: skip
    for expected, env in cases.items():
        with pytest.raises(ConfigError) as caught:
            startup_checks.run(Settings.from_env(tiny_env(**env)))
        message = str(caught.value)
        assert message.startswith(expected.replace("PATH", str(a_file / "sub"))), message
        assert "pa55word" not in message and "s3cr3t" not in message and "admin" not in message
    startup_checks.run(Settings.from_env(tiny_env(**bucket, BUCKET_ENDPOINT_URL=s3_endpoint)))  # a good bucket passes


def test_the_worker_exits_at_start_on_an_unwritable_output_folder(tiny_env, tmp_path):
    import subprocess
    import sys

    from tests.test_handler import ROOT, worker_env

    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = subprocess.run([sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "x"}}'], cwd=ROOT,
                          env=worker_env(tiny_env, SAVE_OUTPUT_DIR=str(a_file)), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert f"invalid configuration: SAVE_OUTPUT_DIR '{a_file}' cannot be written" in done.stderr
    assert "Starting Serverless Worker" not in done.stdout


def test_an_upload_that_fails_mid_job_is_a_sentence_without_credentials(tiny_env, base_holder):
    settings = Settings.from_env(tiny_env(BUCKET_ENDPOINT_URL=f"http://admin:pa55word@127.0.0.1:{_closed_port()}",
                                          BUCKET_ACCESS_KEY_ID="test", BUCKET_SECRET_ACCESS_KEY="s3cr3t-key"))  # fmt: skip
    result = handle(settings, base_holder, JOB)
    assert result["error"].startswith("The edited images could not be uploaded: BUCKET_ENDPOINT_URL "
                                      "http://127.0.0.1:")  # fmt: skip
    assert result["error"].endswith("could not be reached; retry the job.")
    assert "pa55word" not in result["error"] and "admin" not in result["error"]


def test_a_model_folder_under_a_file_stops_the_start_with_a_sentence(tiny_env, tmp_path):
    from config import ConfigError, Settings
    from qwen_edit_worker import startup_checks

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"^MODEL_DIR '{a_file}/models' cannot be written \(Not a directory\)\.$"):
        startup_checks.run(Settings.from_env(tiny_env(MODEL_DIR=str(a_file / "models"))))
