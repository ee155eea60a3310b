"""Image bytes in and out: URLs (fetched by `fetching` under the image limits), base64 and
data URIs, decoding under the pixel and format limits, output encoding."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import Executor
from typing import Iterable

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps, UnidentifiedImageError

from config import Settings
from qwen_edit_worker.errors import InputError
from qwen_edit_worker.jobs import fetching

OUTPUT_MIME = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# zlib level 4 (ComfyUI's too), not Pillow's 6: a 1024² photograph took 123 ms instead of 262
# on a 2-core CPU for 1% more bytes. The encode is on every job's critical path; levels 1-3
# cost 8-11% more bytes.
PNG_COMPRESS_LEVEL = 4
# What people send; Pillow tries only these parsers (AVIF where this Pillow build has it).
INPUT_FORMATS = tuple(f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.registered_extensions().values())
# The text encoder's image processor refuses ratios past 1:200, after the pipeline's own
# resizing, which can stretch a sliver further: 1:100 leaves room.
MAX_ASPECT_RATIO = 100


def load_images(sources: Iterable[str], settings: Settings) -> list[Image.Image]:
    """Fetch or decode each source into an RGB image, in order (blocking)."""
    return [decode_image(read_source(source, n, settings), n, settings) for n, source in enumerate(sources, 1)]


async def load_images_async(sources: Iterable[str], settings: Settings, downloads: Executor) -> list[Image.Image]:
    """`load_images` for the event loop: URLs are fetched on `downloads` (a pool of their own,
    each deadline counted from now, queueing included), everything else on the default pool."""
    loop = asyncio.get_running_loop()
    pending = []
    for n, source in enumerate(sources, 1):
        if is_url(source):
            deadline = fetching.Deadline(settings.image_download_timeout_s)
            pending.append(loop.run_in_executor(downloads, fetch_url, source, n, settings, deadline))
        else:
            pending.append(asyncio.to_thread(read_source, source, n, settings))
    data = await asyncio.gather(*pending)
    return await asyncio.to_thread(lambda: [decode_image(d, n, settings) for n, d in enumerate(data, 1)])


def is_url(source: str) -> bool:
    return source[:16].lower().startswith(("http://", "https://"))


def fetch_url(url: str, n: int, settings: Settings, deadline: fetching.Deadline | None = None) -> bytes:
    return fetching.fetch(url, f"Input image {n}", image_policy(settings), deadline)


def image_policy(settings: Settings) -> fetching.FetchPolicy:
    return fetching.FetchPolicy(
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.image_download_timeout_s,
        allow_private=settings.allow_private_image_urls,
        bytes_setting="MAX_IMAGE_BYTES",
        timeout_setting="IMAGE_DOWNLOAD_TIMEOUT_S",
        private_setting="ALLOW_PRIVATE_IMAGE_URLS",
    )


def read_source(source: str, n: int, settings: Settings) -> bytes:
    lowered = source[:16].lower()
    if is_url(source):
        return fetch_url(source, n, settings)
    if lowered.startswith("data:"):
        return _decode_data_uri(source, n, settings)
    if "://" in source[:32]:
        raise InputError(f"Input image {n} is a URL with an unsupported scheme; only http and https are allowed.")
    return _decode_base64(source, n, settings)


def _decode_data_uri(source: str, n: int, settings: Settings) -> bytes:
    header, sep, payload = source.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InputError(f"Input image {n} is a data URI that is not base64-encoded (expected data:image/...;base64,...).")
    return _decode_base64(payload, n, settings)


def _decode_base64(text: str, n: int, settings: Settings) -> bytes:
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)  # padding is often left out; the length says how much
    if len(compact) * 3 // 4 > settings.max_image_bytes:
        raise InputError(f"Input image {n} is larger than MAX_IMAGE_BYTES ({settings.max_image_bytes} bytes).")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"Input image {n} is neither an http(s) URL nor valid base64.") from None


def decode_image(data: bytes, n: int, settings: Settings) -> Image.Image:
    """An RGB image, or an `InputError` sentence: never a decoder's own exception or text.

    Only the formats people send are tried (fewer parsers, fewer surprises; no containers such
    as ICO that hide a large image behind a small header), and the pixel limit is checked on
    the header of what will be decoded, before any pixel is."""
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own check, for nested images too
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"Input image {n} is not an image in a format the worker reads ({', '.join(INPUT_FORMATS)}).") from None
    except Image.DecompressionBombError:
        raise InputError(f"Input image {n} has more pixels than MAX_IMAGE_PIXELS ({settings.max_image_pixels}).") from None
    except Exception:  # noqa: BLE001 - a header no parser could make sense of
        raise InputError(f"Input image {n} could not be decoded (its header is corrupt).") from None
    # The header gives the size before any pixel is decoded: refuse decompression bombs here.
    if image.width * image.height > settings.max_image_pixels:
        raise InputError(
            f"Input image {n} has {image.width}x{image.height} pixels, more than MAX_IMAGE_PIXELS "
            f"({settings.max_image_pixels})."
        )
    ratio = max(image.width, image.height) / max(1, min(image.width, image.height))
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"Input image {n} is {image.width}x{image.height}, an aspect ratio past 1:{MAX_ASPECT_RATIO}; "
            "crop or pad it."
        )
    kind = image.format
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGBA" if "transparency" in image.info else image.mode).convert("RGB")
        image.load()
    except Image.DecompressionBombError:
        raise InputError(f"Input image {n} has more pixels than MAX_IMAGE_PIXELS ({settings.max_image_pixels}).") from None
    except Exception:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise InputError(f"Input image {n} could not be decoded (its {kind} data is corrupt or truncated).") from None
    return image


def encode_image(pixels: np.ndarray, output_format: str, quality: int) -> bytes:
    image = VaeImageProcessor.numpy_to_pil(pixels[None])[0]
    buffer = io.BytesIO()
    options = {"quality": quality} if output_format in ("jpeg", "webp") else {"compress_level": PNG_COMPRESS_LEVEL}
    image.save(buffer, format=OUTPUT_MIME[output_format], **options)
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
