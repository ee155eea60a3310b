"""A loopback HTTP server for image-fetching tests: real sockets, scripted answers."""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Route = Callable[[BaseHTTPRequestHandler], None]


class ImageServer:
    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        """With `tls`, it speaks HTTPS and records the SNI name each client sent in `sni`."""
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self.sni: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.hits.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda sock, name, context: self.sni.append(name)
            # A failed handshake makes accept() raise an OSError, which the server ignores.
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve_bytes(self, path: str, body: bytes, content_length: bool = True) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            if content_length:
                h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        self.routes[path] = route

    def redirect(self, path: str, location: str) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route

    def trickle(self, path: str, total: int, every_s: float) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.end_headers()
            try:
                for _ in range(total):
                    h.wfile.write(b"x")
                    h.wfile.flush()
                    time.sleep(every_s)
            except OSError:
                pass  # the client gave up, as it should

        self.routes[path] = route

    def raw(self, path: str, data: bytes, every_s: float = 0.0, per_write: int = 1 << 20) -> None:
        """Answer with `data` as it is (status line and headers included), `per_write` bytes at
        a time with a pause of `every_s` between writes; then close the connection."""

        def route(h: BaseHTTPRequestHandler) -> None:
            h.close_connection = True
            try:
                for start in range(0, len(data), per_write):
                    h.wfile.write(data[start : start + per_write])
                    h.wfile.flush()
                    time.sleep(every_s)
            except OSError:
                pass  # the client gave up, as it should

        self.routes[path] = route

    def stream_forever(self, path: str, chunk: int = 64 * 1024, limit: int = 64 * 1024 * 1024) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.end_headers()
            try:
                for _ in range(limit // chunk):  # bounded, in case the client never stops
                    h.wfile.write(b"\0" * chunk)
            except OSError:
                pass

        self.routes[path] = route

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
