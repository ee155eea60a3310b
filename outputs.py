"""Deliver a job's encoded images: inline base64, or URLs from a bucket upload.

Each image is sent once. A one-image result uses the seed worker's single field
(`output_image_base64`, or `output_image_url` from a bucket); a result of several images
is the list `images`. RunPod drops job results above its payload limits (10 MB for /run,
20 MB for /runsync), so a result that would be too large fails with a sentence naming the
limit and the remedies instead of being sent and lost: before the GPU runs when even a
compact encoding could not fit, after encoding otherwise. With a bucket configured,
images are uploaded through runpod's own `rp_upload` and the result carries presigned URLs.
"""

from __future__ import annotations

import json
import logging

from config import Settings
from images import to_base64
from schema import InputError

log = logging.getLogger("qwen_edit_worker.outputs")


# Fewer bytes per pixel than an edited photograph takes in each format (PNG photographs
# take 1.5-2.5; JPEG and WebP at quality 95 about 0.3): a result estimated at this size
# that is over the limit cannot be delivered inline.
MIN_BYTES_PER_PIXEL = {"png": 1.0, "jpeg": 0.1, "webp": 0.05}
BASE64_GROWTH = 4 / 3
RESPONSE_REMEDIES = (
    "set BUCKET_ENDPOINT_URL with its credentials to receive URLs, or ask for output_format jpeg or webp, "
    "fewer images or a smaller size"
)


def deliver(job_id: str, encoded: list[bytes], output_format: str, settings: Settings) -> dict:
    """The image fields of the response: URLs when a bucket is configured, else base64."""
    if settings.uploads_to_bucket:
        values = [_upload(job_id, f"{k}.{output_format}", data, settings) for k, data in enumerate(encoded)]
        single = "output_image_url"
    else:
        values = [to_base64(data) for data in encoded]
        single = "output_image_base64"
    return {single: values[0]} if len(values) == 1 else {"images": values}


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


def check_fits(num_images: int, width: int, height: int, output_format: str, settings: Settings) -> None:
    """Refuse before the GPU runs a result that could not be delivered inline."""
    if settings.uploads_to_bucket:
        return
    least = num_images * width * height * MIN_BYTES_PER_PIXEL[output_format] * BASE64_GROWTH
    if least > settings.max_response_bytes:
        raise InputError(
            f"{num_images} {output_format} image(s) of {width}x{height} would be at least {least / 1e6:.1f} MB, over "
            f"the {settings.max_response_bytes / 1e6:g} MB that RunPod delivers (MAX_RESPONSE_BYTES); {RESPONSE_REMEDIES}."
        )


def check_size(response: dict, settings: Settings) -> None:
    size = len(json.dumps(response))
    if size > settings.max_response_bytes:
        raise InputError(
            f"The result would be {size / 1e6:.1f} MB, over the {settings.max_response_bytes / 1e6:g} MB that RunPod "
            f"delivers (MAX_RESPONSE_BYTES); {RESPONSE_REMEDIES}."
        )
