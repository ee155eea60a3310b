"""A loopback stand-in for RunPod's job queue, speaking the protocol the runpod SDK uses.

The worker runs unmodified (`python handler.py`, JobScaler and all) with the
`RUNPOD_WEBHOOK_*` variables pointing here. Routes, as the SDK calls them:

- GET  /v2/ep/job-take/<worker>?...                 one job (JSON object) or 204
- GET  /v2/ep/job-take-batch/<worker>?...&batch_size=N   up to N jobs (JSON list) or 204
- GET  /v2/ep/job-stop/<worker>?...                 {"jobsToStop": [...]} or 204
- POST /v2/ep/job-done/<worker>/<job id>?...&isStream=false   a result (JSON body)
- GET  /v2/ep/ping/<worker>?...                     heartbeat

Takes long-poll for a short while when there is nothing to give, as RunPod's do.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LONG_POLL_S = 0.3


class RunPodStandIn:
    def __init__(self):
        self.queue: deque[dict] = deque()
        self.taken: list[str] = []
        self.results: dict[str, list[dict]] = {}
        self.progress: dict[str, list[dict]] = {}
        self.stop_requests: list[str] = []
        self.pings = 0
        self.lock = threading.Condition()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def env(self, worker_id: str = "worker-1") -> dict[str, str]:
        base = f"http://127.0.0.1:{self.port}/v2/ep"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": "test-key",
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            # Deployed-mode fitness checks open a connection to a public DNS server: never from tests.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        }

    def add_jobs(self, jobs: list[dict]) -> None:
        with self.lock:
            self.queue.extend(jobs)
            self.lock.notify_all()

    def stop(self, job_id: str) -> None:
        with self.lock:
            self.stop_requests.append(job_id)

    def wait_for_results(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.results) < count:
                if not self.lock.wait(max(0.0, deadline - time.monotonic())):
                    return len(self.results) >= count
            return True

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ protocol

    def _take(self, count: int) -> list[dict]:
        with self.lock:
            if not self.queue:
                self.lock.wait(LONG_POLL_S)
            jobs = [self.queue.popleft() for _ in range(min(count, len(self.queue)))]
            self.taken.extend(job["id"] for job in jobs)
            return jobs

    def _record(self, job_id: str, body: dict, stream: bool) -> None:
        with self.lock:
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append(body.get("output"))
            elif not stream:
                self.results.setdefault(job_id, []).append(body)
            self.lock.notify_all()

    def _stops(self) -> list[str]:
        with self.lock:
            ids, self.stop_requests = self.stop_requests, []
        if not ids:
            time.sleep(LONG_POLL_S)
        return ids

    def _handler_class(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, payload=None) -> None:
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                if "/job-take-batch/" in url.path:
                    jobs = standin._take(int(query.get("batch_size", ["1"])[0]))
                    self._reply(200, jobs) if jobs else self._reply(204)
                elif "/job-take/" in url.path:
                    jobs = standin._take(1)
                    self._reply(200, jobs[0]) if jobs else self._reply(204)
                elif "/job-stop/" in url.path:
                    ids = standin._stops()
                    self._reply(200, {"jobsToStop": ids}) if ids else self._reply(204)
                elif "/ping/" in url.path:
                    with standin.lock:
                        standin.pings += 1
                    self._reply(200, {})
                else:
                    self._reply(404, {"error": "unknown route"})

            def do_POST(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if "/job-done/" in url.path or "/job-stream/" in url.path:
                    standin._record(url.path.rsplit("/", 1)[-1], body, stream="/job-stream/" in url.path)
                    self._reply(200, {})
                else:
                    self._reply(404, {"error": "unknown route"})

            def log_message(self, *args):
                pass

        return Handler
