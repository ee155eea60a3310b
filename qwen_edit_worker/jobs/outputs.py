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
import time
import urllib.parse

from config import Settings
from qwen_edit_worker.errors import InputError
from qwen_edit_worker.jobs.images import to_base64

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


class DeliveryError(Exception):
    """The images were made but could not be delivered; the message says why in one sentence."""


def _upload(job_id: str, name: str, data: bytes, settings: Settings) -> str:
    from runpod.serverless.utils import rp_upload

    try:
        url = rp_upload.upload_in_memory_object(
            name, data, bucket_creds=_credentials(settings), bucket_name=bucket_name(settings), prefix=job_id
        )
    except Exception as error:  # noqa: BLE001 - botocore's errors can show the endpoint with its credentials
        log.warning("upload of %s/%s failed: %s", job_id, name, type(error).__name__)
        raise DeliveryError(
            f"The edited images could not be uploaded: BUCKET_ENDPOINT_URL "
            f"{redact_url(settings.bucket_endpoint_url)} {bucket_problem(error, settings)}; retry the job."
        ) from None
    log.info("uploaded %s/%s (%d bytes)", job_id, name, len(data))
    return url


def _credentials(settings: Settings) -> dict:
    return {"endpointUrl": settings.bucket_endpoint_url, "accessId": settings.bucket_access_key_id,
            "accessSecret": settings.bucket_secret_access_key}  # fmt: skip


def bucket_name(settings: Settings) -> str:
    return settings.bucket_name or time.strftime("%m-%y")  # rp_upload's own default


def bucket_client(settings: Settings):
    """The boto3 client that runpod's rp_upload makes for these credentials."""
    from runpod.serverless.utils.rp_upload import get_boto_client

    return get_boto_client(_credentials(settings))[0]


def bucket_problem(error: BaseException, settings: Settings) -> str:
    """What went wrong, in words, without the library's text (it can hold the URL)."""
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    bucket = repr(bucket_name(settings))
    if not settings.bucket_name:
        bucket += " (BUCKET_NAME is not set: runpod's uploader then names it after the month, MM-YY)"
    if code in ("404", "NoSuchBucket"):
        return f"has no bucket {bucket}"
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"refused the credentials (BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) for bucket {bucket}"
    if code:
        return f"answered with error {code} for bucket {bucket}"
    return "could not be reached"


def redact_url(url: str) -> str:
    """The URL without its user name and password, query and fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    except ValueError:
        return "(a malformed URL)"


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
