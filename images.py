"""Image bytes in and out: safe URL fetching, base64 and data URIs, limits, output encoding.

URLs: http(s) only; the host is resolved once, every address it resolves to must be
public (unless `ALLOW_PRIVATE_IMAGE_URLS`), and the connection goes to the address that
was checked, so a second DNS answer cannot point it elsewhere. Redirects are followed by
hand, each hop checked the same way. Size and time limits are enforced while reading.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
from typing import Iterable

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps, UnidentifiedImageError
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout
from urllib3.exceptions import HTTPError as Urllib3Error

from config import Settings
from schema import InputError

MAX_REDIRECTS = 5
READ_CHUNK = 64 * 1024
USER_AGENT = "qwen-edit-worker/1.0 (+image fetch)"
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
OUTPUT_MIME = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# What people send; Pillow tries only these parsers (AVIF where this Pillow build has it).
INPUT_FORMATS = tuple(f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.registered_extensions().values())
# The text encoder's image processor refuses ratios past 1:200, after the pipeline's own
# resizing, which can stretch a sliver further: 1:100 leaves room.
MAX_ASPECT_RATIO = 100


def load_images(sources: Iterable[str], settings: Settings) -> list[Image.Image]:
    """Fetch or decode each source into an RGB image, in order."""
    return [decode_image(read_source(source, n, settings), n, settings) for n, source in enumerate(sources, 1)]


def read_source(source: str, n: int, settings: Settings) -> bytes:
    lowered = source[:16].lower()
    if lowered.startswith(("http://", "https://")):
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
    options = {"quality": quality} if output_format in ("jpeg", "webp") else {}
    image.save(buffer, format=OUTPUT_MIME[output_format], **options)
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- URL fetching


def fetch_url(url: str, n: int, settings: Settings) -> bytes:
    deadline = time.monotonic() + settings.image_download_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        response = _open(url, n, settings, deadline)
        try:
            if response.status in REDIRECT_STATUSES and response.headers.get("Location"):
                url = urllib.parse.urljoin(url, response.headers["Location"])
                continue
            if response.status != 200:
                raise InputError(f"Input image {n} could not be downloaded: the server answered HTTP {response.status}.")
            return _read_limited(response, n, settings, deadline)
        finally:
            response.release_conn()
    raise InputError(f"Input image {n} redirected more than {MAX_REDIRECTS} times.")


def _open(url: str, n: int, settings: Settings, deadline: float):
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"Input image {n} has a malformed URL.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"Input image {n} must be an http or https URL.")
    address = resolve_public_address(parts.hostname, port, n, settings)
    remaining = max(0.01, deadline - time.monotonic())
    timeout = Timeout(connect=remaining, read=remaining)
    if parts.scheme == "https":
        # Connect to the checked address; SNI and certificate checks still use the host name.
        pool = HTTPSConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                   server_hostname=parts.hostname, assert_hostname=parts.hostname)  # fmt: skip
    else:
        pool = HTTPConnectionPool(address, port, timeout=timeout, retries=False, maxsize=1)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    host_header = parts.netloc.rpartition("@")[2]
    try:
        return pool.urlopen("GET", path, headers={"Host": host_header, "User-Agent": USER_AGENT},
                            redirect=False, preload_content=False, retries=False)  # fmt: skip
    except Urllib3Error as error:
        raise InputError(f"Input image {n} could not be downloaded: {_reason(error)}.") from None


def resolve_public_address(host: str, port: int, n: int, settings: Settings) -> str:
    """Resolve `host` once; refuse it if any address is not public (unless allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"Input image {n} has a host name that does not resolve: {host}.") from None
    addresses = [info[4][0] for info in infos]
    if not settings.allow_private_image_urls:
        for address in addresses:
            if not is_public_address(address):
                raise InputError(
                    f"Input image {n} points to a private or reserved address ({address}); "
                    "only public hosts are fetched unless ALLOW_PRIVATE_IMAGE_URLS=true."
                )
    return addresses[0]


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return is_public_address(str(ip.ipv4_mapped))
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback)


def _read_limited(response, n: int, settings: Settings, deadline: float) -> bytes:
    limit = settings.max_image_bytes
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InputError(f"Input image {n} is larger than MAX_IMAGE_BYTES ({limit} bytes).")
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise InputError(
                f"Input image {n} took longer than IMAGE_DOWNLOAD_TIMEOUT_S ({settings.image_download_timeout_s:g} s) to download."
            )
        try:
            chunk = response.read1(READ_CHUNK)  # returns what one receive gives: a trickle cannot stall it
        except Urllib3Error as error:
            raise InputError(f"Input image {n} could not be downloaded: {_reason(error)}.") from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise InputError(f"Input image {n} is larger than MAX_IMAGE_BYTES ({limit} bytes).")
        chunks.append(chunk)


def _reason(error: BaseException) -> str:
    cause: BaseException | None = error
    while cause is not None:  # an untrusted certificate is the cause of urllib3's SSLError
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the server's TLS certificate was refused ({cause.verify_message})"
        cause = cause.__cause__ or cause.__context__
    reason = getattr(error, "reason", None) or error
    return str(reason).split(": ", 1)[-1][:120]
