"""Deliver a job's encoded images: inline base64, or URLs from a bucket upload.

RunPod drops job results above its payload limits (10 MB for /run, 20 MB for /runsync),
so a result that would be too large fails with a sentence naming the limit and the
remedies instead of being sent and lost. With a bucket configured, images are uploaded
through runpod's own `rp_upload` and the result carries presigned URLs.
"""

from __future__ import annotations

import json
import logging

from config import Settings
from images import to_base64
from schema import InputError

log = logging.getLogger("qwen_edit_worker.outputs")


def deliver(job_id: str, encoded: list[bytes], output_format: str, settings: Settings) -> dict:
    """The image fields of the response: URLs when a bucket is configured, else base64."""
    if settings.uploads_to_bucket:
        urls = [_upload(job_id, f"{k}.{output_format}", data, settings) for k, data in enumerate(encoded)]
        return {"output_image_url": urls[0], "images": urls}
    as_base64 = [to_base64(data) for data in encoded]
    return {"output_image_base64": as_base64[0], "images": as_base64}


def _upload(job_id: str, name: str, data: bytes, settings: Settings) -> str:
    from runpod.serverless.utils import rp_upload

    creds = {
        "endpointUrl": settings.bucket_endpoint_url,
        "accessId": settings.bucket_access_key_id,
        "accessSecret": settings.bucket_secret_access_key,
    }
    url = rp_upload.upload_in_memory_object(
        name, data, bucket_creds=creds, bucket_name=settings.bucket_name or None, prefix=job_id
    )
    log.info("uploaded %s/%s (%d bytes)", job_id, name, len(data))
    return url


def check_size(response: dict, settings: Settings) -> None:
    size = len(json.dumps(response))
    if size > settings.max_response_bytes:
        raise InputError(
            f"The result would be {size / 1e6:.1f} MB, over the {settings.max_response_bytes / 1e6:g} MB that RunPod "
            "delivers (MAX_RESPONSE_BYTES); set BUCKET_ENDPOINT_URL with its credentials to receive URLs, "
            "or ask for output_format jpeg or webp, or fewer images."
        )
