"""Image bytes in and out: base64, data URIs, URLs on a loopback server, limits, encoding."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from config import Settings
from qwen_edit_worker.jobs import fetching, images
from qwen_edit_worker.jobs.schema import InputError
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
    assert "not an image in a format the worker reads" in error_of(base64.b64encode(b"just some text").decode())
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


def test_png_outputs_are_lossless_at_a_faster_zlib_level_than_pillows_default():
    """The encode is on every job's critical path: level 4, which zlib records in the stream's
    header as 'fast' (FLEVEL 1; Pillow's default 6 is FLEVEL 2)."""
    pixels = np.random.default_rng(0).random((64, 48, 3)).astype(np.float32)
    data = images.encode_image(pixels, "png", quality=90)
    offset, first_idat = 8, None
    while first_idat is None:  # PNG chunks: length, type, data, CRC
        length, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
        first_idat = data[offset + 8:offset + 8 + length] if kind == b"IDAT" else None
        offset += 12 + length
    assert first_idat[1] >> 6 == 1  # FLEVEL
    expected = (pixels * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), expected)


@pytest.mark.parametrize(
    "address, public",
    [("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
     ("169.254.169.254", False), ("224.0.0.1", False), ("0.0.0.0", False), ("100.64.0.1", False), ("::1", False),
     ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
     ("2001:4860:4860::8888", True), ("ff02::1", False), ("240.0.0.1", False)],
)  # fmt: skip
def test_public_address_classification(address, public):
    assert fetching.is_public_address(address) is public


# ----------------------------------------------------------------- SSRF defences
# Private ranges are covered by resolving names through a patched resolver: no traffic
# ever goes to them. Servers listen on loopback addresses only.


REAL_GETADDRINFO = fetching.socket.getaddrinfo


def is_ip_literal(host: str) -> bool:
    try:
        fetching.ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def fake_resolver(monkeypatch, answers) -> list[str]:
    """Make `socket.getaddrinfo` answer names from `answers` (a dict, or a function of the
    name); IP literals resolve as usual. Returns the log of names asked."""
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if is_ip_literal(host):
            return REAL_GETADDRINFO(host, port, *args, **kwargs)
        asked.append(host)
        addresses = answers(host) if callable(answers) else answers.get(host)
        if not addresses:
            raise fetching.socket.gaierror("unknown host")
        return [(fetching.socket.AF_INET6 if ":" in a else fetching.socket.AF_INET, fetching.socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in addresses]  # fmt: skip

    monkeypatch.setattr(fetching.socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.fixture
def no_connections(monkeypatch):
    """Fail the test if any connection is even set up."""

    def refuse(*args, **kwargs):
        raise AssertionError("a refused URL must never be fetched")

    monkeypatch.setattr(fetching, "WatchedHTTPPool", refuse)
    monkeypatch.setattr(fetching, "WatchedHTTPSPool", refuse)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.0.0.5", "172.20.1.1", "192.168.0.10", "169.254.169.254", "100.64.1.1", "0.0.0.0",
     "224.0.0.251", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd12:3456::1", "ff02::1",
     "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::1", "64:ff9b::a00:1"],
)  # fmt: skip
def test_names_resolving_to_non_public_addresses_are_refused_unfetched(monkeypatch, no_connections, address):
    fake_resolver(monkeypatch, {"images.example": [address]})
    for scheme in ("http", "https"):
        message = error_of(f"{scheme}://images.example/cat.png", STRICT)
        assert "private or reserved address" in message and address in message


def test_a_name_with_one_private_address_among_public_ones_is_refused(monkeypatch, no_connections):
    fake_resolver(monkeypatch, {"mixed.example": ["93.184.216.34", "10.1.1.1"]})
    assert "10.1.1.1" in error_of("http://mixed.example/a.png", STRICT)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x.example/", "ftp://x.example/a.png",
                                 "http:///nohost.png", "http://[::1", "http://x.example:99999/a.png"])  # fmt: skip
def test_malformed_and_non_http_urls_are_refused(monkeypatch, no_connections, url):
    fake_resolver(monkeypatch, {})
    with pytest.raises(InputError):
        images.load_images([url], STRICT)


@pytest.fixture
def loopback_is_public_except_127_0_0_2(monkeypatch):
    """Pretend 127.0.0.1 is a public host and 127.0.0.2 a private one (both are loopback here)."""
    real = fetching.is_public_address
    monkeypatch.setattr(fetching, "is_public_address", lambda a: a == "127.0.0.1" or (a != "127.0.0.2" and real(a)))


def test_every_redirect_hop_is_checked(monkeypatch, loopback_is_public_except_127_0_0_2):
    public, private = ImageServer("127.0.0.1"), ImageServer("127.0.0.2")
    try:
        private.serve_bytes("/secret.png", png_bytes(random_image(4, 4)))
        public.redirect("/go", f"http://internal.example:{private.port}/secret.png")
        asked = fake_resolver(monkeypatch, {"cdn.example": ["127.0.0.1"], "internal.example": ["127.0.0.2"]})
        message = error_of(f"http://cdn.example:{public.port}/go", STRICT)
        assert "private or reserved address (127.0.0.2)" in message
        assert asked == ["cdn.example", "internal.example"]
        assert public.hits == ["/go"] and private.hits == []
    finally:
        public.close()
        private.close()


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch, loopback_is_public_except_127_0_0_2):
    """A second DNS answer (rebinding) cannot redirect the fetch: the name is resolved once per hop."""
    public, private = ImageServer("127.0.0.1"), ImageServer("127.0.0.2")
    try:
        public.serve_bytes("/a.png", png_bytes(random_image(8, 6)))
        private.serve_bytes("/a.png", png_bytes(random_image(2, 2)))
        answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
        asked = fake_resolver(monkeypatch, lambda host: next(answers))
        (image,) = images.load_images([f"http://rebind.example:{public.port}/a.png"], STRICT)
        assert image.size == (8, 6) and asked == ["rebind.example"]
        assert public.hits == ["/a.png"] and private.hits == []
    finally:
        public.close()
        private.close()


def test_the_host_header_keeps_the_requested_name(monkeypatch, loopback_is_public_except_127_0_0_2):
    server = ImageServer("127.0.0.1")
    seen = []

    def route(h):
        seen.append(h.headers["Host"])
        body = png_bytes(random_image(3, 3))
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    server.routes["/h.png"] = route
    try:
        fake_resolver(monkeypatch, {"named.example": ["127.0.0.1"]})
        images.load_images([f"http://named.example:{server.port}/h.png"], STRICT)
        assert seen == [f"named.example:{server.port}"]
    finally:
        server.close()


def test_too_many_redirects(server):
    server.redirect("/loop", "/loop")
    assert "redirected more than 5 times" in error_of(server.url("/loop"))


# ----------------------------------------------------------------- HTTPS
# A loopback HTTPS server with certificates from a throwaway authority, trusted through
# SSL_CERT_FILE (OpenSSL's default trust store, which the fetch loads): the same client
# code that talks to public hosts.


@pytest.fixture(scope="module")
def authorities(tmp_path_factory):
    from tests.pki import Authority

    directory = tmp_path_factory.mktemp("pki")
    return Authority(directory, "trusted-test-ca"), Authority(directory, "unknown-test-ca")


def https_server(authority, certificate_name: str) -> ImageServer:
    server = ImageServer("127.0.0.1", tls=authority.server_context(certificate_name))
    server.serve_bytes("/a.png", png_bytes(random_image(7, 5)))
    return server


def test_https_connects_to_the_checked_address_and_checks_the_certificate_against_the_name(
    monkeypatch, loopback_is_public_except_127_0_0_2, authorities
):
    trusted, _ = authorities
    monkeypatch.setenv("SSL_CERT_FILE", trusted.cert_file)
    server = https_server(trusted, "images.example")
    try:
        asked = fake_resolver(monkeypatch, {"images.example": ["127.0.0.1"]})
        (image,) = images.load_images([f"https://images.example:{server.port}/a.png"], STRICT)
        assert image.size == (7, 5) and asked == ["images.example"]
        assert server.sni == ["images.example"]  # SNI carries the name, not the address connected to
        assert server.hits == ["/a.png"]
    finally:
        server.close()


@pytest.mark.parametrize("case", ["certificate for another name", "unknown authority"])
def test_https_refuses_a_certificate_that_does_not_prove_the_name(
    monkeypatch, loopback_is_public_except_127_0_0_2, authorities, case
):
    trusted, unknown = authorities
    monkeypatch.setenv("SSL_CERT_FILE", trusted.cert_file)
    if case == "certificate for another name":
        server = https_server(trusted, "other.example")
        reason = "the server's TLS certificate was refused (hostname 'images.example' doesn't match 'other.example')"
    else:
        server, reason = https_server(unknown, "images.example"), "the server's TLS certificate was refused (unable to get"
    try:
        fake_resolver(monkeypatch, {"images.example": ["127.0.0.1"]})
        message = error_of(f"https://images.example:{server.port}/a.png", STRICT)
        assert message.startswith(f"Input image 1 could not be downloaded: {reason}"), message
        assert server.hits == []  # no request was sent over the unproven connection
    finally:
        server.close()


def test_an_image_past_the_aspect_ratio_limit_is_refused_by_name():
    with pytest.raises(InputError, match=r"^Input image 2 is 4x2304, an aspect ratio past 1:100; crop or pad it\.$"):
        images.decode_image(png_bytes(Image.new("RGB", (4, 2304))), 2, STRICT)
    assert images.decode_image(png_bytes(Image.new("RGB", (24, 2400))), 1, STRICT).size == (24, 2400)


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_a_header_claiming_a_huge_image_gets_the_pixel_sentence():
    with pytest.raises(InputError) as caught:
        images.decode_image(_png_claiming(20000, 20000), 1, STRICT)
    assert str(caught.value).startswith("Input image 1 has ") and str(caught.value).endswith("MAX_IMAGE_PIXELS (16777216).")


def test_an_icon_container_hiding_a_large_png_is_not_decoded():
    import struct

    inner = png_bytes(Image.new("L", (6000, 6000)))  # 36 MP behind a header that says 16x16
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(inner), 22) + inner
    start = time.monotonic()
    with pytest.raises(InputError, match=r"^Input image 1 is not an image in a format the worker reads \(PNG, JPEG"):
        images.decode_image(icon, 1, STRICT)
    assert time.monotonic() - start < 1.0  # refused from the header, not decoded


SENTENCES = (
    "Input image 1 is not an image in a format the worker reads (",
    "Input image 1 could not be decoded (its header is corrupt).",
    "Input image 1 could not be decoded (its ",
    "Input image 1 has ",
    "Input image 1 is ",
)


def test_mutated_images_give_an_image_or_a_sentence_never_a_decoders_exception():
    import random

    rng = random.Random(1234)
    base = random_image(32, 24, seed=9)
    seeds = [png_bytes(base, fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")]
    seeds.append(png_bytes(base, "PNG", optimize=True))
    deadline, tried, refused = time.monotonic() + 20, 0, 0
    while tried < 4000 and time.monotonic() < deadline:
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            action = rng.random()
            if action < 0.6:
                data[at] = rng.randrange(256)
            elif action < 0.8:
                del data[at : at + rng.randint(1, 64)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        tried += 1
        try:
            image = images.decode_image(bytes(data), 1, STRICT)
            assert image.mode == "RGB"
        except InputError as error:
            refused += 1
            assert str(error).startswith(SENTENCES), str(error)
    assert tried >= 1000 and refused > 0


def test_unpadded_base64_is_accepted():
    data = png_bytes(Image.new("RGB", (7, 5), "red"), pnginfo=None) + b"\0"  # a trailing byte: padding needed
    unpadded = base64.b64encode(data).decode().rstrip("=")
    assert len(data) % 3 and len(unpadded) % 4
    assert images.load_images([unpadded], STRICT)[0].size == (7, 5)
    assert images.load_images(["data:image/png;base64," + unpadded], STRICT)[0].size == (7, 5)


# ----------------------------------------------------------------- limits in time, errors in words

ONE_SECOND = Settings.from_env({"ALLOW_PRIVATE_IMAGE_URLS": "true", "IMAGE_DOWNLOAD_TIMEOUT_S": "1"})
TOO_SLOW = "Input image 1 took longer than IMAGE_DOWNLOAD_TIMEOUT_S (1 s) to download."


def timed_error(url: str, settings: Settings = ONE_SECOND) -> tuple[str, float]:
    start = time.monotonic()
    message = error_of(url, settings)
    return message, time.monotonic() - start


def test_headers_trickled_a_byte_at_a_time_cannot_stretch_the_limit(server):
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: y\r\n" % i for i in range(200)) + b"\r\n"
    server.raw("/headers", head, every_s=0.05, per_write=1)
    message, took = timed_error(server.url("/headers"))
    assert message == TOO_SLOW and took < 1.5


def test_a_body_trickled_slower_than_the_limit_ends_at_the_limit(server):
    body = png_bytes(random_image(4, 4))
    server.raw("/body", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, every_s=0.8, per_write=8)
    message, took = timed_error(server.url("/body"))
    assert message == TOO_SLOW and took < 1.5


def test_the_limit_covers_every_redirect_together(server):
    for hop in range(4):
        server.raw(f"/hop{hop}", b"HTTP/1.1 302 Found\r\nLocation: /hop%d\r\nContent-Length: 0\r\n\r\n" % (hop + 1),
                   every_s=0.1, per_write=10)  # each hop takes about 0.6 s: fine alone, too slow together  # fmt: skip
    server.serve_bytes("/hop4", png_bytes(random_image(4, 4)))
    message, took = timed_error(server.url("/hop0"))
    assert message == TOO_SLOW and took < 1.5


@pytest.mark.parametrize(("answer", "expected"), [
    (b"NONSENSE\r\n\r\n", "the connection broke off or the answer was not valid HTTP"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10, "the connection broke off or the answer was not valid HTTP"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n", None),
])  # fmt: skip
def test_broken_answers_get_a_sentence_without_library_internals(server, answer, expected):
    server.raw("/broken", answer)
    message = error_of(server.url("/broken"))
    if expected is None:
        assert message == "Input image 1 redirected to a malformed URL."
    else:
        assert message == f"Input image 1 could not be downloaded: {expected}."
    for internal in ("BadStatusLine", "IncompleteRead", "Connection aborted", "ValueError", "timeout=", "Error("):
        assert internal not in message


def test_a_closed_port_is_a_sentence():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert error_of(f"http://127.0.0.1:{port}/a.png") == "Input image 1 could not be downloaded: the server could not be reached."
