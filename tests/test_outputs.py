"""Delivering results: bucket uploads against a real S3 protocol server, and payload limits."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import urllib.request

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from config import Settings
from service import EditService
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
    assert "output_image_base64" not in result
    urls = result["images"]
    assert len(urls) == 2 and result["output_image_url"] == urls[0]
    assert all(url.startswith(f"{s3_endpoint}/edits/job-1/") and "X-Amz-Signature" in url for url in urls)
    downloaded = [Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=10).read())) for url in urls]
    assert [img.size for img in downloaded] == [(64, 64), (64, 64)]
    inline = handle(dataclasses.replace(settings, bucket_endpoint_url=""), base_holder, {**JOB, "num_images": 2})
    for url, b64 in zip(urls, inline["images"]):  # the same bytes as the inline answer
        assert urllib.request.urlopen(url, timeout=10).read() == base64.b64decode(b64)


def test_a_result_over_the_payload_limit_fails_with_the_remedies(tiny_env, base_holder):
    settings = Settings.from_env(tiny_env(MAX_RESPONSE_BYTES="100000"))
    result = handle(settings, base_holder, {**JOB, "width": 512, "height": 512, "num_images": 2})
    message = result["error"]
    assert "over the 0.1 MB that RunPod delivers (MAX_RESPONSE_BYTES)" in message
    assert "BUCKET_ENDPOINT_URL" in message and "jpeg or webp" in message and "fewer images" in message
    small = handle(settings, base_holder, JOB)
    assert "error" not in small and small["output_image_base64"]
