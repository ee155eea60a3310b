"""Safe URL fetching, for input images (and, later, LoRA files).

- http(s) only; the host is resolved once per hop, and every address it resolves to must
  be public (unless the policy allows private ones); the connection goes to the address
  that was checked, so a second DNS answer cannot point it elsewhere (TLS still sends the
  host name as SNI and checks the certificate against it).
- Redirects are followed by hand, each hop checked the same way.
- The size limit is enforced while reading, with or without Content-Length.
- The time limit is for the whole exchange (connect, TLS, status line, headers, body, every
  redirect): a watchdog shuts the socket down at the deadline, so a server that trickles
  one byte at a time cannot stretch it (per-read timeouts restart with every byte).
- Downloads run on their own bounded thread pool, so slow servers never hold the threads
  other jobs need.
- Every failure is one sentence naming what was fetched; never a library's text.
"""

from __future__ import annotations

import heapq
import http.client
import io
import ipaddress
import itertools
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError, ProtocolError, SSLError

from qwen_edit_worker.errors import InputError

MAX_REDIRECTS = 5
READ_CHUNK = 64 * 1024
USER_AGENT = "qwen-edit-worker/1.0 (+fetch)"
REDIRECT_STATUSES = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one kind of download, and the settings that set them (named in errors)."""

    max_bytes: int
    timeout_s: float
    allow_private: bool
    bytes_setting: str
    timeout_setting: str
    private_setting: str


class Deadline:
    """The end of a whole download; at it, every socket opened for it is shut down."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self.expired = False
        self.cancelled = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        _WATCHDOG.add(self)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._sockets.clear()

    def expire(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


class _Watchdog:
    """One thread for every deadline: it sleeps until the earliest and expires it."""

    def __init__(self):
        self._heap: list[tuple[float, int, Deadline]] = []
        self._cond = threading.Condition()
        self._count = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._count), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, deadline = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline.expire()


_WATCHDOG = _Watchdog()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or in the TLS handshake
    except OSError:
        pass


_watching = threading.local()  # the deadline of the download this thread is running


class _Watched:
    def _new_conn(self):
        sock = super()._new_conn()
        _watching.deadline.watch(sock)
        return sock


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def downloads_pool(threads: int) -> ThreadPoolExecutor:
    """A pool for downloads alone (size it to the downloads that may run at once)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="download")


def fetch(url: str, subject: str, policy: FetchPolicy, deadline: Deadline | None = None) -> bytes:
    """The body at `url`, or an `InputError` sentence that starts with `subject`. The deadline
    may be set earlier (when the download was queued), so that waiting counts too."""
    buffer = io.BytesIO()
    fetch_into(url, buffer, subject, policy, deadline)
    return buffer.getvalue()


def fetch_into(url: str, sink: BinaryIO, subject: str, policy: FetchPolicy, deadline: Deadline | None = None) -> int:
    """Write the body at `url` into `sink` (a file, for large downloads); the bytes written."""
    deadline = deadline or Deadline(policy.timeout_s)
    _watching.deadline = deadline
    try:
        return _follow(url, sink, subject, policy, deadline)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever broke, the client gets a sentence
        if deadline.expired:
            raise _too_slow(subject, policy) from None
        raise InputError(f"{subject} could not be downloaded: {describe(error)}.") from None
    finally:
        deadline.cancel()
        _watching.deadline = None


def _follow(url: str, sink: BinaryIO, subject: str, policy: FetchPolicy, deadline: Deadline) -> int:
    for _ in range(MAX_REDIRECTS + 1):
        if deadline.expired or deadline.remaining() <= 0:
            raise _too_slow(subject, policy)
        response = _open(url, subject, policy, deadline)
        try:
            if response.status in REDIRECT_STATUSES and response.headers.get("Location"):
                try:
                    url = urllib.parse.urljoin(url, response.headers["Location"])
                except ValueError:
                    raise InputError(f"{subject} redirected to a malformed URL.") from None
                continue
            if response.status != 200:
                raise InputError(f"{subject} could not be downloaded: the server answered HTTP {response.status}.")
            return _read_limited(response, sink, subject, policy, deadline)
        finally:
            response.release_conn()
    raise InputError(f"{subject} redirected more than {MAX_REDIRECTS} times.")


def _open(url: str, subject: str, policy: FetchPolicy, deadline: Deadline):
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{subject} has a malformed URL.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{subject} must be an http or https URL.")
    address = resolve_public_address(parts.hostname, port, subject, policy)
    remaining = max(0.01, deadline.remaining())
    timeout = Timeout(connect=remaining, read=remaining)
    if parts.scheme == "https":
        # Connect to the checked address; SNI and certificate checks still use the host name.
        pool = WatchedHTTPSPool(address, port, timeout=timeout, retries=False, maxsize=1,
                                server_hostname=parts.hostname, assert_hostname=parts.hostname)  # fmt: skip
    else:
        pool = WatchedHTTPPool(address, port, timeout=timeout, retries=False, maxsize=1)
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    host_header = parts.netloc.rpartition("@")[2]
    return pool.urlopen("GET", path, headers={"Host": host_header, "User-Agent": USER_AGENT},
                        redirect=False, preload_content=False, retries=False)  # fmt: skip


def resolve_public_address(host: str, port: int, subject: str, policy: FetchPolicy) -> str:
    """Resolve `host` once; refuse it if any address is not public (unless allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"{subject} has a host name that does not resolve: {host}.") from None
    addresses = [info[4][0] for info in infos]
    if not policy.allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise InputError(
                    f"{subject} points to a private or reserved address ({address}); "
                    f"only public hosts are fetched unless {policy.private_setting}=true."
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


def _read_limited(response, sink: BinaryIO, subject: str, policy: FetchPolicy, deadline: Deadline) -> int:
    limit = policy.max_bytes
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InputError(f"{subject} is larger than {policy.bytes_setting} ({limit} bytes).")
    total = 0
    while True:
        if deadline.expired:
            raise _too_slow(subject, policy)
        chunk = response.read1(READ_CHUNK)  # what one receive gives: the watchdog ends a trickle
        if not chunk:
            if deadline.expired:
                raise _too_slow(subject, policy)
            return total
        total += len(chunk)
        if total > limit:
            raise InputError(f"{subject} is larger than {policy.bytes_setting} ({limit} bytes).")
        sink.write(chunk)


def _too_slow(subject: str, policy: FetchPolicy) -> InputError:
    return InputError(f"{subject} took longer than {policy.timeout_setting} ({policy.timeout_s:g} s) to download.")


def describe(error: BaseException) -> str:
    """What went wrong with a download, in words (a library's text can be long and cryptic)."""
    cause: BaseException | None = error
    while cause is not None:  # an untrusted certificate is the cause of urllib3's SSLError
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the server's TLS certificate was refused ({cause.verify_message})"
        if isinstance(cause, ssl.CertificateError) or "doesn't match" in str(cause):
            return f"the server's TLS certificate was refused ({_first_line(cause)})"
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, NewConnectionError) or isinstance(error, ConnectionRefusedError):
        return "the server could not be reached"
    if isinstance(error, SSLError):
        return "the TLS connection failed"
    if isinstance(error, ProtocolError) or isinstance(error, http.client.HTTPException):
        return "the connection broke off or the answer was not valid HTTP"
    if isinstance(error, (Urllib3Error, OSError)):
        return "the connection failed"
    return "the download failed"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(": ", 1)[-1][:120]
