"""Image bytes in and out: base64, data URIs, URLs on a loopback server, limits, encoding."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

import images
from config import Settings
from schema import InputError
from tests.conftest import random_image
from tests.image_server import ImageServer

LOOPBACK_OK = Settings.from_env({"ALLOW_PRIVATE_IMAGE_URLS": "true", "MAX_IMAGE_BYTES": "200000", "IMAGE_DOWNLOAD_TIMEOUT_S": "2"})
STRICT = Settings.from_env({})


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def server():
    srv = ImageServer()
    yield srv
    srv.close()


def error_of(source: str, settings: Settings = LOOPBACK_OK) -> str:
    with pytest.raises(InputError) as caught:
        images.load_images([source], settings)
    return str(caught.value)


def test_base64_and_data_uri_decode_to_the_same_rgb_image():
    data = png_bytes(random_image(20, 10))
    plain = base64.b64encode(data).decode()
    wrapped = "\n".join(plain[i : i + 16] for i in range(0, len(plain), 16))  # MIME-style line breaks
    decoded = images.load_images([plain, "data:image/png;base64," + plain, wrapped], STRICT)
    assert all(img.mode == "RGB" and img.size == (20, 10) for img in decoded)
    assert np.array_equal(np.asarray(decoded[0]), np.asarray(decoded[1]))


def test_invalid_base64_non_image_and_oversize_each_get_their_own_sentence():
    assert "neither an http(s) URL nor valid base64" in error_of("not base64 at all!")
    assert "not an image format" in error_of(base64.b64encode(b"just some text").decode())
    assert "larger than MAX_IMAGE_BYTES" in error_of("A" * 300000)
    assert "not base64-encoded" in error_of("data:image/png,rawbytes")
    assert "only http and https" in error_of("ftp://example.com/a.png")


def test_pixel_limit_is_checked_before_decoding():
    settings = Settings.from_env({"MAX_IMAGE_PIXELS": "10000"})
    big = base64.b64encode(png_bytes(Image.new("RGB", (200, 100)))).decode()
    assert "MAX_IMAGE_PIXELS" in error_of(big, settings)


def test_exif_orientation_is_applied():
    image = random_image(30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    data = png_bytes(image, "JPEG", exif=exif.tobytes())
    (decoded,) = images.load_images([base64.b64encode(data).decode()], STRICT)
    assert decoded.size == (10, 30)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    data = png_bytes(Image.new(mode, (8, 8)), fmt)
    (decoded,) = images.load_images([base64.b64encode(data).decode()], STRICT)
    assert decoded.mode == "RGB"


def test_url_is_fetched_from_a_loopback_server_when_private_urls_are_allowed(server):
    data = png_bytes(random_image(16, 12))
    server.serve_bytes("/a.png", data)
    server.redirect("/moved", "/a.png")
    (direct, redirected) = images.load_images([server.url("/a.png"), server.url("/moved")], LOOPBACK_OK)
    assert direct.size == redirected.size == (16, 12)
    assert server.hits == ["/a.png", "/moved", "/a.png"]


def test_loopback_url_is_refused_by_default_and_never_fetched(server):
    server.serve_bytes("/a.png", png_bytes(random_image(4, 4)))
    message = error_of(server.url("/a.png"), STRICT)
    assert "private or reserved address" in message and "ALLOW_PRIVATE_IMAGE_URLS" in message
    assert server.hits == []


def test_http_errors_and_oversize_bodies(server):
    assert "HTTP 404" in error_of(server.url("/missing.png"))
    server.serve_bytes("/big", b"\0" * 300000)
    assert "MAX_IMAGE_BYTES" in error_of(server.url("/big"))
    server.stream_forever("/endless")
    assert "MAX_IMAGE_BYTES" in error_of(server.url("/endless"))


def test_a_trickling_server_is_given_up_on_at_the_deadline(server):
    server.trickle("/slow", total=100, every_s=0.1)
    started = time.monotonic()
    assert "IMAGE_DOWNLOAD_TIMEOUT_S" in error_of(server.url("/slow"))
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_outputs_are_encoded_in_the_requested_format(fmt, magic):
    pixels = np.random.default_rng(0).random((12, 16, 3)).astype(np.float32)
    data = images.encode_image(pixels, fmt, quality=90)
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).size == (16, 12)
    assert base64.b64decode(images.to_base64(data)) == data


@pytest.mark.parametrize(
    "address, public",
    [("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
     ("169.254.169.254", False), ("224.0.0.1", False), ("0.0.0.0", False), ("100.64.0.1", False), ("::1", False),
     ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
     ("2001:4860:4860::8888", True), ("ff02::1", False), ("240.0.0.1", False)],
)  # fmt: skip
def test_public_address_classification(address, public):
    assert images.is_public_address(address) is public
