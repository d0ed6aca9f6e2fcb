"""A tiny, fully local "web" of image-text pairs, served over real HTTP on 127.0.0.1.

Why this exists: the pipeline's first stage is img2dataset, which fetches with urllib and decodes with
OpenCV. Mocking either would test our assumptions about them rather than their behaviour, so the test
suite and ``capfilt demo`` instead point the real downloader at a real socket. The pictures are the
synthetic world's shapes with *true* captions, so the captioner/filter stages have something checkable
to chew on, and the hostile cases reproduce what a crawl of the real web returns. Each case's
``expected`` family was set by running img2dataset 1.47's own ``download_image`` and ``Resizer`` on
these exact bytes (and is re-checked by ``tests/test_sample_web.py``), not by guessing from file formats.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from pipeline.synthetic.world import describe, random_scene, render

__all__ = ["Route", "SamplePair", "StaticSite", "good_pairs", "hostile_pairs", "jpeg_bytes", "png_bytes",
           "render_scene", "sample_web"]  # fmt: skip


@dataclass(frozen=True)
class Route:
    """One canned HTTP response."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()  # e.g. (("Content-Type", "image/jpeg"),)
    stall_s: float = 0.0  # sleep before answering, to exercise client timeouts
    trickle_s: float = 0.0  # send the body a byte at a time, this long apart (no read ever times out)
    trickle_headers: bool = False  # with trickle_s: the status line and headers too
    reset: bool = False  # answer nothing: close the connection with a TCP reset


class _QuietServer(ThreadingHTTPServer):
    """Daemon handler threads so ``stop()`` never waits on a stalled route; clients that hang up early
    (timeouts) are expected here, so their broken pipes are not printed as tracebacks."""

    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class StaticSite:
    """Threaded HTTP server on a free port of 127.0.0.1 (or another loopback address), serving a dict of
    path -> Route.

    Routes are matched on the URL path only (a query string is ignored), unknown paths get 404, and
    requests are counted per path so tests can prove that a path was *never* fetched (e.g. after a
    stage should have skipped it). Works as a context manager or via ``start()``/``stop()``.
    """

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1") -> None:
        if not host.startswith("127."):
            raise ValueError(f"StaticSite serves on loopback only (127.0.0.0/8), not {host}")
        self.host = host
        self._routes: dict[str, Route] = dict(routes)
        self._hits: Counter[str] = Counter()
        self._first_hit: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, path: str, route: Route) -> None:
        """Register (or replace) a route; safe while the server is running."""
        with self._lock:
            self._routes[path] = route

    def _lookup(self, raw_path: str) -> tuple[str, Route | None]:
        path = urlsplit(raw_path).path
        with self._lock:
            self._hits[path] += 1
            self._first_hit.setdefault(path, time.time())
            return path, self._routes.get(path)

    def start(self) -> StaticSite:
        if self._server is not None:
            return self
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                _, route = site._lookup(self.path)
                if route is None:
                    route = Route(404, b"not found", (("Content-Type", "text/plain"),))
                if route.stall_s > 0:
                    time.sleep(route.stall_s)
                if route.reset:
                    linger = struct.pack("ii", 1, 0)  # on, 0 s: close() sends RST, not FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.connection.close()
                    self.close_connection = True
                    return
                try:
                    self.send_response(route.status)
                    names = {name.lower() for name, _ in route.headers}
                    for name, value in route.headers:
                        self.send_header(name, value)
                    if not {"content-length", "transfer-encoding"} & names:  # a route may lie on purpose
                        self.send_header("Content-Length", str(len(route.body)))
                    if route.trickle_headers:
                        self._headers_buffer.append(b"\r\n")
                        head, self._headers_buffer = b"".join(self._headers_buffer), []
                        self._trickle(head, route.trickle_s)
                    else:
                        self.end_headers()
                    if self.command != "HEAD":
                        self._send_body(route)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (e.g. timed out during a stall)

            do_HEAD = do_GET

            def _send_body(self, route: Route) -> None:
                if route.trickle_s <= 0:
                    self.wfile.write(route.body)
                else:
                    self._trickle(route.body, route.trickle_s)

            def _trickle(self, data: bytes, pause_s: float) -> None:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(pause_s)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests and the demo should not spray one stderr line per request

        self._server = _QuietServer((self.host, 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="sample-web", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> StaticSite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("StaticSite is not running; call start() or use it as a context manager")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits[path]

    def first_hit(self, path: str) -> float | None:
        """When (`time.time()`) `path` was first requested; None when never."""
        with self._lock:
            return self._first_hit.get(path)

    @property
    def total_hits(self) -> int:
        with self._lock:
            return sum(self._hits.values())


@dataclass(frozen=True)
class SamplePair:
    path: str  # URL path on the site, e.g. "/img/0003.jpg"
    route: Route
    caption: str | None  # the web alt-text for this row
    expected: str  # capfilt fate family: "ok", "download_failed", "decode_failed", "blocked"


def render_scene(seed: int, size: int = 96) -> tuple[Image.Image, str]:
    """A deterministic picture from the synthetic world (`pipeline.synthetic.world`) and a true caption."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    return render(scene, size), describe(scene, rng)


def jpeg_bytes(image: Image.Image, quality: int = 90, mode: str = "RGB") -> bytes:
    """Encode as JPEG in ``mode`` ("RGB", "L" or "CMYK")."""
    buf = io.BytesIO()
    image.convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(image: Image.Image, mode: str = "RGBA") -> bytes:
    """Encode as PNG in ``mode``; "I;16" gives a true 16-bit grayscale PNG (0..65535, not 0..255)."""
    if mode == "I;16":
        wide = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        converted = Image.fromarray(wide)
    else:
        converted = image.convert(mode)
    buf = io.BytesIO()
    converted.save(buf, format="PNG")
    return buf.getvalue()


def _ok(body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()) -> Route:
    return Route(200, body, (("Content-Type", content_type), *extra))


def good_pairs(n: int, seed: int = 0, size: int = 96) -> list[SamplePair]:
    """n ordinary JPEG images with their true captions (expected='ok')."""
    pairs = []
    for i in range(n):
        image, caption = render_scene(seed * 100_003 + i, size)
        pairs.append(SamplePair(f"/img/{i:04d}.jpg", _ok(jpeg_bytes(image), "image/jpeg"), caption, "ok"))
    return pairs


def hostile_pairs(seed: int = 0) -> list[SamplePair]:
    """One pair per hostile case, with the fate img2dataset 1.47 really gives it (see module docstring).

    Notes from running the real Resizer (OpenCV 4.14): *any* truncated JPEG fails to decode (even at
    99% of its bytes), so 40% is kept; a 16-bit PNG decodes but img2dataset's JPEG re-encode saturates
    it to near-white, so it is "ok" for the downloader yet useless to the captioner, unless capfilt's
    `image_guard` makes it 8-bit first (as a capfilt job does). The full catalogue, with the cases
    that depend on a job's limits, is tests/test_hostile_web.py.
    """
    scenes = [render_scene(seed * 100_003 + 50_000 + k) for k in range(6)]
    jpeg = jpeg_bytes(scenes[0][0])
    html = b"<!doctype html><html><head><title>Oops</title></head><body>Not found</body></html>\n"
    jpeg_ct, html_ct = "image/jpeg", "text/html; charset=utf-8"
    dl, dec = "download_failed", "decode_failed"
    # Promises the whole JPEG but sends 500 bytes, then closes: urllib raises IncompleteRead.
    short = Route(200, jpeg[:500], (("Content-Type", jpeg_ct), ("Content-Length", str(len(jpeg)))))
    cases: list[tuple[str, Route, str | None, str]] = [
        ("404.jpg", Route(404, b"not found", (("Content-Type", "text/plain"),)), "a missing photo", dl),
        ("500.jpg", Route(500, html, (("Content-Type", html_ct),)), "a server error", dl),
        ("short-transfer.jpg", short, scenes[0][1], dl),
        ("not-an-image.jpg", _ok(b"just some text, not pixels\n" * 8, jpeg_ct), "random bytes", dec),
        ("html-page.jpg", _ok(html, jpeg_ct), "an html page", dec),
        ("empty.jpg", _ok(b"", jpeg_ct), "an empty response", dec),
        ("truncated.jpg", _ok(jpeg[: int(len(jpeg) * 0.4)], jpeg_ct), scenes[0][1], dec),
        ("alpha.png", _ok(png_bytes(scenes[1][0], "RGBA"), "image/png"), scenes[1][1], "ok"),
        ("gray.jpg", _ok(jpeg_bytes(scenes[2][0], mode="L"), jpeg_ct), "a grayscale picture of shapes", "ok"),
        ("cmyk.jpg", _ok(jpeg_bytes(scenes[3][0], mode="CMYK"), jpeg_ct), scenes[3][1], "ok"),
        ("16bit.png", _ok(png_bytes(scenes[4][0], "I;16"), "image/png"), scenes[4][1], "ok"),
        ("1x1.png", _ok(png_bytes(Image.new("RGBA", (1, 1), (200, 30, 30, 255))), "image/png"), None, "ok"),
        ("1x1.jpg", _ok(jpeg_bytes(Image.new("RGB", (1, 1), (30, 60, 220))), jpeg_ct), "a blue dot", "ok"),
        ("noai.jpg", _ok(jpeg_bytes(scenes[5][0]), jpeg_ct, (("X-Robots-Tag", "noai"),)), scenes[5][1],
         "blocked"),
    ]  # fmt: skip
    return [SamplePair(f"/hostile/{name}", route, caption, fate) for name, route, caption, fate in cases]


def sample_web(n_good: int, seed: int = 0, size: int = 96) -> list[SamplePair]:
    """good_pairs + hostile_pairs, deterministic order (good first, then hostile)."""
    return good_pairs(n_good, seed, size) + hostile_pairs(seed)
