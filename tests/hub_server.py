"""A loopback stand-in for the Hugging Face Hub: the file and tree endpoints huggingface_hub
uses to list a repo and download a file, with real HTTP, so LoRAs named by repo id are
fetched the way a deployed worker fetches them."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "c0ffee" + "0" * 34


class HubServer:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> {path: bytes}
        self.gated: set[str] = set()  # repos whose terms the caller has not accepted: 403, as the Hub answers
        self.requests: list[tuple[str, str]] = []  # (method, path)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 (http.server's name)
                hub._answer(self, body=False)

            def do_GET(self):  # noqa: N802
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def downloads(self, repo: str) -> int:
        """GET requests for the files of `repo` (listing and HEAD requests not counted)."""
        return sum(method == "GET" and path.startswith(f"/{repo}/resolve/") for method, path in self.requests)

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if any(f"/{repo}/" in path + "/" for repo in self.gated):
            return self._missing(handler, "GatedRepo", status=403)
        if parts[:2] == ["api", "models"] and "tree" in parts:  # /api/models/{owner}/{name}/tree/{revision}
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._missing(handler, "RepoNotFound")
            listing = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                       for name, data in self.repos[repo].items()]  # fmt: skip
            return self._send(handler, json.dumps(listing).encode(), "application/json", body)
        if len(parts) >= 5 and parts[2] == "resolve":  # /{owner}/{name}/resolve/{revision}/{file}
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            data = self.repos.get(repo, {}).get(name)
            if data is None:
                return self._missing(handler, "EntryNotFound" if repo in self.repos else "RepoNotFound")
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(handler, data, "application/octet-stream", body, headers)
        self._missing(handler, "RepoNotFound")

    @staticmethod
    def _send(handler, data: bytes, kind: str, body: bool, headers: dict | None = None) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _missing(handler, code: str, status: int = 404) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def close(self) -> None:
        self.httpd.shutdown()
