"""What a download may connect to and what it may bring back, enforced inside the HTTP client.

`urlpolicy` judges each URL of the list before the download, which spares a request per blocked row
but cannot see what happens later: a redirect to an intranet host, a DNS answer that changes between
the check and the fetch, a body of gigabytes, a server that trickles a byte a second so that no single
read ever times out. img2dataset fetches with `urllib.request.urlopen`, which uses the process's
installed opener; `FetchGuard.installed()` puts in one that
- connects only to addresses the job's `NetworkPolicy` allows: each name is resolved once per
  connection, every address is checked, and the socket is opened to those very addresses, so what
  was checked is what is connected to (redirect hops included: each one is a new connection);
- checks a redirect's target before following it, so the row's error names the redirect;
- speaks http and https only (no file, ftp or data handlers) and ignores proxy variables, since a
  proxy would hide the address really fetched;
- stops reading a body past `max_body_bytes`, or `timeout` seconds after the request was sent.

A refused connection raises `Refused`, whose text starts with `BLOCKED` and becomes the row's
`error` (img2dataset records `str(err)`); the writer gives such rows the fate `blocked`.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import http.client
import itertools
import re
import socket
import string
import threading
import time
import urllib.request
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin

from pipeline.ingest.urlpolicy import NetworkPolicy, check_url
from pipeline.spec.config import DownloadSpec

BLOCKED = "blocked: "
_READ_SIZE = 1 << 16
_TIMED_OUT = "timed out: {what} took longer than {timeout:g} s to arrive"


class Refused(Exception):
    """A connection the policy forbids. Not an OSError: urllib wraps those in URLError, and this one's
    message must reach the row's `error` as it is."""


@dataclass(frozen=True)
class FetchGuard:
    policy: NetworkPolicy
    max_body_bytes: int
    timeout: float

    @classmethod
    def of(cls, download: DownloadSpec) -> FetchGuard:
        return cls(NetworkPolicy.of(download), download.max_body_bytes, download.timeout)

    def opener(self) -> urllib.request.OpenerDirector:
        opener = urllib.request.OpenerDirector()
        for handler in (
            _GuardedHandler(self.policy, self.timeout),
            _GuardedRedirects(self.policy),
            _BodyBounds(self.max_body_bytes, self.timeout),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            opener.add_handler(handler)
        return opener

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """`urlopen` in this process goes through the guard until the block ends."""
        previous = getattr(urllib.request, "_opener", None)
        urllib.request.install_opener(self.opener())
        try:
            yield
        finally:
            urllib.request.install_opener(previous)


def connect_checked(
    policy: NetworkPolicy,
    address: tuple[str, int],
    timeout: Any = None,
    source_address: Any = None,
    *,
    deadline_s: float | None = None,
    **_: Any,
) -> socket.socket:
    """`socket.create_connection`, but to allowed addresses only; any refused address refuses the host,
    as in `urlpolicy` (a name is as safe as its worst address). With `deadline_s`, the socket is shut
    down that many seconds after it connected, whatever is still being read from it."""
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for *_rest, sockaddr in infos:
        refusal = policy.refusal(sockaddr[0])
        if refusal is not None:
            raise Refused(f"{BLOCKED}host {host}: {refusal}")
    errors: list[OSError] = []
    for family, kind, proto, _name, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, int | float):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            if deadline_s is not None:
                _WATCHDOG.watch(sock, deadline_s)
            return sock
        except OSError as err:
            sock.close()
            errors.append(err)
    raise errors[-1] if errors else OSError(f"{host} resolved to no address")


class _Guarded:
    """Makes an http.client connection open its socket through `connect_checked` and put it on the
    watch for its deadline."""

    def __init__(self, *args: Any, policy: NetworkPolicy, deadline_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(connect_checked, policy, deadline_s=deadline_s)


class _GuardedHTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _GuardedHandler(urllib.request.HTTPSHandler):
    """http and https, each through its guarded connection."""

    http_request = (
        urllib.request.AbstractHTTPHandler.do_request_
    )  # HTTPHandler's, as HTTPSHandler has https's

    def __init__(self, policy: NetworkPolicy, timeout: float) -> None:
        super().__init__()
        self.policy, self.timeout = policy, timeout

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self._open(_GuardedHTTPConnection, req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self._open(_GuardedHTTPSConnection, req, context=self._context)

    def _open(self, kind: type, req: urllib.request.Request, **extra: Any) -> http.client.HTTPResponse:
        connection = functools.partial(kind, policy=self.policy, deadline_s=self.timeout)
        with _timed_out_after(self.timeout, req):
            return self.do_open(connection, req, **extra)


@contextlib.contextmanager
def _timed_out_after(timeout: float, req: urllib.request.Request) -> Iterator[None]:
    """A request the watchdog cut off (its status line or headers trickled in) fails as what it is, a
    timeout, not as the "remote end closed" that the cut makes http.client see."""
    try:
        yield
    except Refused:
        raise
    except Exception as err:
        if time.monotonic() - getattr(req, "capfilt_sent_at", time.monotonic()) >= timeout:
            raise TimeoutError(_TIMED_OUT.format(timeout=timeout, what="the response")) from err
        raise


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp too and checks no address; this refuses, before any connection,
    any target the URL list itself could not contain (`urlpolicy.check_url`)."""

    def __init__(self, policy: NetworkPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = headers.get("location") or headers.get("uri")
        if target:  # the URL urllib will request: joined and quoted as HTTPRedirectHandler does
            newurl = quote(urljoin(req.full_url, target), encoding="iso-8859-1", safe=string.punctuation)
            verdict = check_url(newurl, self.policy)
            if verdict is not None:
                fp.close()
                raise Refused(f"{BLOCKED}redirect to {newurl}: {verdict.error}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _BodyBounds(urllib.request.BaseHandler):
    """Every response's `read()` stops at `max_bytes`, and at `timeout` seconds after the request.

    The socket timeout bounds each read, not the whole body: a server sending a byte every second
    would hold a download thread for ever. Reading with `read1` returns what has arrived, so the
    deadline is checked between arrivals; the watchdog cuts what one read would wait on past it (a
    chunk-size line trickled in), and the cut is reported as the timeout it is."""

    handler_order = 100  # before HTTPErrorProcessor: redirect hops are bounded too

    def __init__(self, max_bytes: int, timeout: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        req.capfilt_sent_at = time.monotonic()  # type: ignore[attr-defined]
        return req

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        declared = response.headers.get("Content-Length", "").strip()
        if re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > self.max_bytes:
            response.close()
            raise ValueError(self._too_large(f"it declares {int(declared)} bytes"))
        deadline = getattr(req, "capfilt_sent_at", time.monotonic()) + self.timeout
        response.read = functools.partial(self._read_whole, response, deadline)
        return response

    https_request = http_request
    https_response = http_response

    def _read_whole(self, response: http.client.HTTPResponse, deadline: float, amt: Any = None) -> bytes:
        """The body, whole (`amt` is ignored: img2dataset reads whole bodies, and so does this)."""
        chunks, size = [], 0
        while True:
            try:
                chunk = response.read1(_READ_SIZE) if time.monotonic() <= deadline else None
            except Exception:
                if time.monotonic() <= deadline:
                    raise
                chunk = None
            if chunk is None or (not chunk and time.monotonic() > deadline):
                raise TimeoutError(_TIMED_OUT.format(timeout=self.timeout, what="the body"))
            if not chunk:
                break
            size += len(chunk)
            if size > self.max_bytes:
                response.close()
                raise ValueError(self._too_large(f"more than {self.max_bytes} bytes arrived"))
            chunks.append(chunk)
        body = b"".join(chunks)
        if response.length:  # the connection closed before the declared Content-Length arrived
            raise http.client.IncompleteRead(body, response.length)
        return body

    def _too_large(self, why: str) -> str:
        return f"body over download.max_body_bytes ({self.max_bytes}): {why}"


class _Watchdog:
    """One thread per process that shuts each watched socket down at its deadline.

    A socket timeout bounds each wait, not a whole response: a status line, a header or a chunk-size
    line sent a byte at a time (each byte within the timeout) would hold a download thread for as
    long as the server likes. Shutting the socket down ends whatever read is waiting on it, over
    TLS too. Sockets are held weakly: a closed or collected one is simply skipped."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, weakref.ref[socket.socket]]] = []
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> None:
        with self._wake:
            heapq.heappush(self._due, (time.monotonic() + seconds, next(self._ids), weakref.ref(sock)))
            if self._thread is None or not self._thread.is_alive():  # a forked child has none
                self._thread = threading.Thread(target=self._run, name="capfilt-fetch-deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due:
                    self._wake.wait()
                due, _, ref = self._due[0]
                if due > time.monotonic():
                    self._wake.wait(due - time.monotonic())
                    continue
                heapq.heappop(self._due)
            sock = ref()
            if sock is not None and sock.fileno() != -1:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()
