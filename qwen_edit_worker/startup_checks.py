"""Settings that can only be checked by trying them, tried once at start.

A GPU that cannot run the model or its precision, a folder that cannot be written or a bucket
that cannot be reached would otherwise fail every job (and on RunPod, every replacement
worker's); like a bad value, they stop the worker before it takes one, with a sentence.
URLs are shown without their userinfo: an endpoint may carry credentials.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.parse

from config import ConfigError, Settings
from qwen_edit_worker.engine import devices, flash_attention
from qwen_edit_worker.gpus import gpus
from qwen_edit_worker.jobs import schema
from qwen_edit_worker.jobs.outputs import bucket_client, bucket_name, bucket_problem, redact_url

log = logging.getLogger("qwen_edit_worker.startup")


def run(settings: Settings) -> None:
    check_device(settings)
    check_writable("MODEL_DIR", settings.model_dir)  # downloads, the LoRA cache, the compile cache
    check_writable("SAVE_OUTPUT_DIR", settings.save_output_dir)
    check_bucket(settings)
    schema.default_loras(settings)  # LORAS entries are valid LoRA entries (fetched at start)
    gpus.check_gpu_count(settings)


def check_device(settings: Settings) -> None:
    """The GPU that the model and PRECISION_MODE need. Found only when the model loads, a
    missing one failed each job taken meanwhile with "retry", and RunPod replaced the worker
    with one that failed the same way."""
    try:
        device, dtype = devices.resolve_device_and_dtype(settings)
        devices.check_precision_supported(settings, device)
    except devices.DeviceError as error:
        raise ConfigError(str(error)) from None
    if settings.attention_backend == "fa3" and (reason := flash_attention.unavailable_reason(device, dtype)):
        raise ConfigError(f"ATTENTION_BACKEND=fa3 cannot be used here: {reason}; use auto (FlashAttention-3 where it "
                          "runs, PyTorch's SDPA elsewhere) or native.")  # fmt: skip


def check_writable(variable: str, folder: str) -> None:
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"{variable} {folder!r} cannot be written ({error.strerror or 'not a folder'}).") from None


def check_bucket(settings: Settings) -> None:
    endpoint = settings.bucket_endpoint_url
    credentials = settings.bucket_access_key_id and settings.bucket_secret_access_key
    if not endpoint:
        if credentials:
            raise ConfigError("BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY are set but BUCKET_ENDPOINT_URL is not.")
        return
    shown = redact_url(endpoint)
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"BUCKET_ENDPOINT_URL must be an http or https URL; got {shown!r}.")
    if not credentials:
        raise ConfigError("BUCKET_ENDPOINT_URL is set but BUCKET_ACCESS_KEY_ID or BUCKET_SECRET_ACCESS_KEY is not.")
    bucket = bucket_name(settings)
    try:
        bucket_client(settings).head_bucket(Bucket=bucket)
    except Exception as error:  # noqa: BLE001 - botocore's errors, named below in words
        raise ConfigError(f"BUCKET_ENDPOINT_URL {shown} {bucket_problem(error, settings)}.") from None
    log.info("bucket %r at %s is reachable: outputs are uploaded", bucket, shown)
