"""The web side of the hostile-input catalogue, through the real pipeline.

One job fetches every case below from servers on 127.0.0.1 (and, for the network policy, 127.0.0.2
and 127.0.0.3, which the job must never reach): each case is a row of the URL list, each section's
test checks that its rows met their fates, and the last test checks the accounting of the whole job.
The job's limits are set low (`JOB_DOWNLOAD`) so that the limit cases stay small and fast.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFile

from pipeline.ingest.fetch_guard import FetchGuard
from pipeline.ingest.urlpolicy import NetworkPolicy
from pipeline.job.runner import JobResult, run_job
from pipeline.spec.fates import Fate
from pipeline.synthetic.sample_web import Route, StaticSite, jpeg_bytes, png_bytes, render_scene
from tests.catalogue import SCORED, SCORED_FATES, Case, Section, assert_scored
from tests.conftest import make_spec, read_records

pytestmark = pytest.mark.usefixtures("ray_local")

TIMEOUT_S = 2
MAX_BODY_BYTES = 200_000
MAX_IMAGE_PIXELS = 1_000_000
JOB_DOWNLOAD = {
    "timeout": TIMEOUT_S,
    "max_body_bytes": MAX_BODY_BYTES,
    "max_image_pixels": MAX_IMAGE_PIXELS,
    "allow_private_networks": False,
    "allowed_networks": ["127.0.0.1/32"],  # the test web, and nothing else that is not public
    "denied_networks": ["127.0.0.2/32"],
}
DENIED_HOST, PRIVATE_HOST = (
    "127.0.0.2",
    "127.0.0.3",
)  # both loopback: a failing guard sends nothing off the machine


# --- bodies -------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _halves(size: tuple[int, int] = (120, 60)) -> Image.Image:
    """Left half blue, right half red: which way up it is stored shows whether EXIF was applied."""
    image = Image.new("RGB", size, (200, 20, 20))
    image.paste((20, 20, 200), (0, 0, size[0] // 2, size[1]))
    return image


def _exif_rotated(mode: str = "RGB") -> bytes:
    """Stored 120x60 (blue left), EXIF orientation 6: displayed 60x120, blue on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_halves().convert(mode), "JPEG", exif=exif.tobytes())


def _radiance_hdr() -> bytes:
    import cv2

    return cv2.imencode(".hdr", np.full((40, 60, 3), 0.5, np.float32))[1].tobytes()


def _half_transparent_png() -> bytes:
    image = Image.new("RGBA", (64, 64), (20, 20, 200, 255))
    image.paste((20, 20, 200, 0), (0, 0, 64, 32))  # top half fully transparent
    return _encode(image, "PNG")


def _gif_first_red_then_green() -> bytes:
    frames = [Image.new("RGB", (64, 64), color) for color in ((220, 20, 20), (20, 220, 20))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _png_16_bit(mode: str) -> bytes:
    """A true 16-bit PNG (bit depth 16 in its header) of a mid-gray or red-and-blue picture."""
    if mode == "gray":
        return _encode(Image.fromarray(np.full((48, 64), 120 * 257, dtype=np.uint16)), "PNG")
    import cv2

    bgr = np.asarray(_halves())[:, :, ::-1].astype(np.uint16) * 257
    return cv2.imencode(".png", bgr)[1].tobytes()


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: ~50 kB on the wire, 400 M pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)
    pixels = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


SCENE = render_scene(7)
JPEG = jpeg_bytes(SCENE[0])
PNG = png_bytes(SCENE[0], "RGB")
UNSIZED = "not an image format whose size can be read before decoding"
HTML = b"<!doctype html><html><body>Not found</body></html>\n"


def _ok(body: bytes, content_type: str = "image/jpeg", *headers: tuple[str, str], **route: Any) -> Route:
    return Route(200, body, (("Content-Type", content_type), *headers), **route)


def _redirect(location: str, status: int = 302) -> Route:
    return Route(status, b"", (("Location", location),))


# --- the cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebCase:
    case: Case
    route: Route | None = None  # served at /case/<name> on 127.0.0.1
    url: str | None = None  # or a literal URL ({denied}, {private}, {site} are filled in)
    stored: Callable[[Image.Image], None] | None = None  # a check of the image as stored in the tar


def _upright(image: Image.Image) -> None:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert image.size == (60, 120), image.size  # turned once: 120x60 stored, 60x120 displayed
    top, bottom = pixels[:60].mean(axis=(0, 1)), pixels[60:].mean(axis=(0, 1))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2], (top, bottom)


def _not_white(image: Image.Image) -> None:
    assert np.asarray(image.convert("L")).mean() < 200  # 16 bits saturated to 8 would be all white


def _transparent_is_white(image: Image.Image) -> None:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels[:28].min() > 240 and pixels[36:, :, 2].mean() > 150  # matted on white; opaque stays blue


def _first_frame(image: Image.Image) -> None:
    red, green, _ = np.asarray(image.convert("RGB")).astype(int).mean(axis=(0, 1))
    assert red > 150 > green


def _size(width: int, height: int) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        assert image.size == (width, height)

    return check


IMAGES = [
    WebCase(Case("truncated-jpeg", "a JPEG cut at 40 % of its bytes", Fate.DECODE_FAILED, "Image decoding error"),
            _ok(JPEG[: int(len(JPEG) * 0.4)])),
    WebCase(Case("truncated-png", "a PNG cut at half its bytes", Fate.DECODE_FAILED, "Image decoding error"),
            _ok(PNG[: len(PNG) // 2], "image/png")),
    WebCase(Case("not-an-image", "text served as image/jpeg", Fate.DECODE_FAILED, UNSIZED),
            _ok(b"just some text, not pixels\n" * 8)),
    WebCase(Case("html-as-jpeg", "an HTML error page served as image/jpeg", Fate.DECODE_FAILED, UNSIZED),
            _ok(HTML)),
    WebCase(Case("radiance-hdr", "a Radiance HDR image: OpenCV decodes it, its size cannot be read first", Fate.DECODE_FAILED,
                 UNSIZED), _ok(_radiance_hdr(), "image/vnd.radiance")),
    WebCase(Case("empty-body", "200 with an empty body", Fate.DECODE_FAILED, UNSIZED), _ok(b"")),
    WebCase(Case("png-alpha", "PNG whose top half is transparent", SCORED, "matted on white"),
            _ok(_half_transparent_png(), "image/png"), stored=_transparent_is_white),
    WebCase(Case("png-palette", "palette (P mode) PNG", SCORED), _ok(_encode(_halves().convert("P"), "PNG"), "image/png")),
    WebCase(Case("png-palette-transparency", "palette PNG with a transparent index", SCORED),
            _ok(_encode(_halves().convert("P"), "PNG", transparency=0), "image/png")),
    WebCase(Case("png-16-bit-gray", "16-bit grayscale PNG", SCORED, "made 8-bit, not white"),
            _ok(_png_16_bit("gray"), "image/png"), stored=_not_white),
    WebCase(Case("png-16-bit-rgb", "16-bit RGB PNG", SCORED, "made 8-bit, not white"),
            _ok(_png_16_bit("rgb"), "image/png"), stored=_not_white),
    WebCase(Case("jpeg-cmyk", "CMYK JPEG", SCORED), _ok(jpeg_bytes(SCENE[0], mode="CMYK"))),
    WebCase(Case("jpeg-gray", "grayscale JPEG", SCORED), _ok(jpeg_bytes(SCENE[0], mode="L"))),
    WebCase(Case("exif-rotated", "JPEG stored 120x60 with EXIF orientation 6", SCORED, "stored upright, 60x120"),
            _ok(_exif_rotated()), stored=_upright),
    WebCase(Case("exif-rotated-cmyk", "the same as a CMYK JPEG", SCORED, "stored upright, 60x120"),
            _ok(_exif_rotated("CMYK")), stored=_upright),
    WebCase(Case("animated-gif", "animated GIF, red then green", SCORED, "first frame"),
            _ok(_gif_first_red_then_green(), "image/gif"), stored=_first_frame),
    WebCase(Case("webp", "WebP", SCORED), _ok(_encode(SCENE[0], "WEBP"), "image/webp")),
    WebCase(Case("one-pixel", "a 1x1 PNG", SCORED), _ok(png_bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "RGB"), "image/png"),
            stored=_size(1, 1)),
    WebCase(Case("wide-4000x2", "a 4000x2 image", SCORED), _ok(_encode(Image.new("RGB", (4000, 2), (0, 200, 0)), "PNG"), "image/png"),
            stored=_size(4000, 2)),
    WebCase(Case("tall-2x4000", "a 2x4000 image", SCORED), _ok(_encode(Image.new("RGB", (2, 4000), (0, 200, 0)), "PNG"), "image/png"),
            stored=_size(2, 4000)),
    WebCase(Case("decompression-bomb", f"a 48 kB PNG declaring 20000x20000 pixels (limit {MAX_IMAGE_PIXELS})", Fate.DECODE_FAILED,
                 "over download.max_image_pixels"), _ok(_bomb_png(), "image/png")),
    WebCase(Case("oversized-declared", f"a body declaring 300 kB (limit {MAX_BODY_BYTES} bytes)", Fate.DOWNLOAD_FAILED,
                 "over download.max_body_bytes"), _ok(b"\xff" * 300_000)),
    WebCase(Case("oversized-chunked", "a 300 kB chunked body, no Content-Length", Fate.DOWNLOAD_FAILED,
                 "over download.max_body_bytes"), _ok(_chunked(b"\xff" * 300_000), "image/jpeg", ("Transfer-Encoding", "chunked"))),
]  # fmt: skip

TRANSPORT = [
    WebCase(Case("http-404", "404 Not Found", Fate.DOWNLOAD_FAILED, "HTTP Error 404"), Route(404, b"nope")),
    WebCase(Case("http-403", "403 Forbidden", Fate.DOWNLOAD_FAILED, "HTTP Error 403"), Route(403, b"no")),
    WebCase(Case("http-500", "500 with an HTML body", Fate.DOWNLOAD_FAILED, "HTTP Error 500"), Route(500, HTML)),
    WebCase(Case("stall", f"no answer for {TIMEOUT_S + 1} s (timeout {TIMEOUT_S} s)", Fate.DOWNLOAD_FAILED, "timed out"),
            _ok(JPEG, stall_s=TIMEOUT_S + 1)),
    WebCase(Case("trickle", f"a byte every 0.1 s: every read is quick, the body takes 15 s (timeout {TIMEOUT_S} s)",
                 Fate.DOWNLOAD_FAILED, "timed out: the body took longer than"), _ok(JPEG[:150], trickle_s=0.1)),
    WebCase(Case("trickle-headers", "the status line and headers a byte every 0.1 s", Fate.DOWNLOAD_FAILED,
                 "timed out: "), _ok(JPEG[:150], trickle_s=0.1, trickle_headers=True)),
    WebCase(Case("trickle-chunk-line", "a chunked body whose 100-byte chunk-size line comes a byte every 0.1 s",
                 Fate.DOWNLOAD_FAILED, "timed out: the body took longer than"),
            _ok(b"96;" + b"x" * 100 + b"\r\n" + JPEG[:150] + b"\r\n0\r\n\r\n", "image/jpeg",
                ("Transfer-Encoding", "chunked"), trickle_s=0.1)),
    WebCase(Case("connection-reset", "the server resets the connection", Fate.DOWNLOAD_FAILED, "Connection reset"),
            Route(reset=True)),
    WebCase(Case("short-transfer", "declares the whole JPEG, sends 500 bytes and closes", Fate.DOWNLOAD_FAILED, "IncompleteRead"),
            _ok(JPEG[:500], "image/jpeg", ("Content-Length", str(len(JPEG))))),
    WebCase(Case("connection-refused", "nothing listens on the port", Fate.DOWNLOAD_FAILED, "Connection refused"),
            url="http://127.0.0.1:9/closed.jpg"),
    WebCase(Case("non-ascii-url", "a URL with é in its path (sent percent-encoded, as browsers do)", SCORED,
                 "the row keeps the URL as given"), url="{site}/case/café.jpg"),
    WebCase(Case("redirect-good", "302 to a good image", SCORED), _redirect("/case/redirect-target")),
    WebCase(Case("redirect-with-space", "302 to `/case/redirect target.jpg`, the space not encoded", SCORED),
            _redirect("/case/redirect target.jpg")),
    WebCase(Case("redirect-chain", "301, 307 then 308 to a good image", SCORED), _redirect("/case/hop-1", 301)),
    WebCase(Case("redirect-loop", "a redirect to itself", Fate.DOWNLOAD_FAILED, "infinite loop"),
            _redirect("/case/redirect-loop")),
    WebCase(Case("x-robots-noai", "X-Robots-Tag: noai", Fate.BLOCKED, "opt-out: Use of image disallowed by X-Robots-Tag"),
            _ok(JPEG, "image/jpeg", ("X-Robots-Tag", "noai"))),
    WebCase(Case("x-robots-noimageindex", "X-Robots-Tag: noindex, noimageindex", Fate.BLOCKED, "opt-out"),
            _ok(JPEG, "image/jpeg", ("X-Robots-Tag", "noindex, noimageindex"))),
    WebCase(Case("x-robots-other-bot", "X-Robots-Tag: otherbot: noai (not addressed to us)", SCORED),
            _ok(JPEG, "image/jpeg", ("X-Robots-Tag", "otherbot: noai"))),
]  # fmt: skip

NETWORK = [
    WebCase(Case("file-url", "file:///etc/passwd in the list", Fate.BLOCKED, "scheme 'file' is not allowed"),
            url="file:///etc/passwd"),
    WebCase(Case("ftp-url", "ftp:// in the list", Fate.BLOCKED, "scheme 'ftp' is not allowed"), url="ftp://127.0.0.1/a.jpg"),
    WebCase(Case("denied-network", f"a URL on {DENIED_HOST}, in download.denied_networks", Fate.BLOCKED,
                 f"{DENIED_HOST} is in denied network {DENIED_HOST}/32"), url="{denied}/secret.jpg"),
    WebCase(Case("private-not-allowed", f"a URL on {PRIVATE_HOST}: loopback, not in download.allowed_networks",
                 Fate.BLOCKED, "is a private, loopback or link-local address"), url="{private}/secret.jpg"),
    WebCase(Case("redirect-to-denied", f"302 from 127.0.0.1 to {DENIED_HOST}", Fate.BLOCKED,
                 f"blocked: redirect to http://{DENIED_HOST}"), _redirect("{denied}/secret.jpg")),
    WebCase(Case("redirect-to-private", f"302 from 127.0.0.1 to {PRIVATE_HOST}", Fate.BLOCKED,
                 "is a private, loopback or link-local address"), _redirect("{private}/secret.jpg")),
    WebCase(Case("redirect-to-file", "302 to file:///etc/passwd", Fate.BLOCKED, "blocked: redirect to file:///etc/passwd"),
            _redirect("file:///etc/passwd")),
    WebCase(Case("redirect-to-ftp", "302 to ftp://", Fate.BLOCKED, "scheme 'ftp' is not allowed"),
            _redirect("ftp://127.0.0.1/a.jpg")),
    WebCase(Case("path-traversal", "a URL and caption full of ../ and /etc/passwd", SCORED, "keys are numbers; files stay in output.path"),
            _ok(JPEG)),
]  # fmt: skip

EXTRA_ROUTES = {
    "/case/redirect%20target.jpg": _ok(JPEG),
    "/case/caf%C3%A9.jpg": _ok(JPEG),
    "/case/redirect-target": _ok(JPEG),
    "/case/hop-1": _redirect("/case/hop-2", 307),
    "/case/hop-2": _redirect("/case/redirect-target", 308),
}

CATALOGUE = [
    Section("Images", "Bodies that arrive whole but are not the plain RGB JPEG a captioner wants. The job's limits "
            f"here: download.max_image_pixels {MAX_IMAGE_PIXELS}, download.max_body_bytes {MAX_BODY_BYTES}.",
            tuple(c.case for c in IMAGES)),
    Section("Transport", f"What the HTTP exchange itself can do wrong (download.timeout {TIMEOUT_S} s).",
            tuple(c.case for c in TRANSPORT)),
    Section("Network policy", "URLs and redirects to what a crawler must not fetch. The job allows 127.0.0.1/32 "
            f"(download.allowed_networks), denies {DENIED_HOST}/32 and leaves private networks closed; the "
            f"servers on {DENIED_HOST} and {PRIVATE_HOST} must get no request at all.",
            tuple(c.case for c in NETWORK)),
]  # fmt: skip
ALL = IMAGES + TRANSPORT + NETWORK


# --- the job ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebJob:
    result: JobResult
    records: dict[str, dict[str, Any]]  # by case name
    images: dict[str, Image.Image]  # by case name, kept rows only
    forbidden: list[StaticSite]  # the denied and the private server
    urls: list[str | None]  # the URL list, in order


def _row_url(case: WebCase, site: StaticSite, denied: StaticSite, private: StaticSite) -> str:
    fill = {"denied": denied.base_url, "private": private.base_url, "site": site.base_url}
    return case.url.format(**fill) if case.url else site.url(f"/case/{case.case.name}")


@pytest.fixture(scope="module")
def web_job(tmp_path_factory, tiny_models) -> Iterator[WebJob]:
    denied_site = StaticSite({"/secret.jpg": _ok(JPEG)}, host=DENIED_HOST)
    private_site = StaticSite({"/secret.jpg": _ok(JPEG)}, host=PRIVATE_HOST)
    with StaticSite({}) as site, denied_site, private_site:
        fill = {"denied": denied_site.base_url, "private": private_site.base_url}
        for case in ALL:
            if case.route is not None:
                headers = tuple((k, v.format(**fill)) for k, v in case.route.headers)  # redirect targets
                site.add(f"/case/{case.case.name}", dataclasses.replace(case.route, headers=headers))
        for path, route in EXTRA_ROUTES.items():
            site.add(path, route)
        rows = []
        for case in ALL:
            url = _row_url(case, site, denied_site, private_site)
            if case.case.name == "path-traversal":
                url = site.url("/case/path-traversal") + "?f=../../../../etc/passwd&key=../../x"
                rows.append((url, "../../../etc/passwd\x00/../shards/00000.tar"))
            else:
                rows.append((url, f"a picture for case {case.case.name}"))
        tmp = tmp_path_factory.mktemp("hostile-web")
        spec = make_spec(tmp, rows, tiny_models, download=JOB_DOWNLOAD)
        result = run_job(spec, log=lambda _: None)
        records = read_records(result.layout)
        by_url = {r["url"]: r for r in records}
        named = {c.case.name: by_url[url] for c, (url, _) in zip(ALL, rows, strict=True)}
        images = _stored_images(result)
        images_by_case = {name: images[r["key"]] for name, r in named.items() if r["key"] in images}
        yield WebJob(result, named, images_by_case, [denied_site, private_site], [u for u, _ in rows])


def _stored_images(result: JobResult) -> dict[str, Image.Image]:
    tars = [str(p) for p in sorted(result.layout.shards.glob("*.tar"))]
    found = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        image = Image.open(io.BytesIO(sample["jpg"]))
        image.load()
        found[sample["__key__"]] = image
    return found


def _check_case(job: WebJob, case: WebCase) -> None:
    record = job.records[case.case.name]
    if case.case.outcome == SCORED:
        assert_scored(record)
        assert record["synthetic_captions"], record  # it reached the captioner
    else:
        assert record["status"] == case.case.outcome, record
        assert case.case.says in (record["error"] or ""), record["error"]
    if case.stored is not None:
        image = job.images.get(case.case.name)
        if image is None:  # filtered rows are not in the tar: the raw shard holds what the captioner saw
            image = _raw_image(job.result, record["key"])
        case.stored(image)


def _raw_image(result: JobResult, key: str) -> Image.Image:
    from pipeline.core.tars import read_jpegs

    shard = key[:5]
    data = read_jpegs(result.layout.raw_tar(shard), {key})[key]
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("case", IMAGES, ids=lambda c: c.case.id)
def test_images(web_job, case):
    _check_case(web_job, case)


@pytest.mark.parametrize("case", TRANSPORT, ids=lambda c: c.case.id)
def test_transport(web_job, case):
    _check_case(web_job, case)


@pytest.mark.parametrize("case", NETWORK, ids=lambda c: c.case.id)
def test_network_policy(web_job, case):
    _check_case(web_job, case)
    for site in web_job.forbidden:
        assert site.total_hits == 0, f"{site.base_url} was fetched"


def test_nothing_escapes_the_output_directory(web_job):
    root = Path(str(web_job.result.layout.root.path))
    outside = [p for p in root.rglob("*") if not p.resolve().is_relative_to(root.resolve())]
    assert not outside
    key = re.compile(r"^\d+$")
    for record in web_job.records.values():
        assert key.match(record["key"]), record["key"]
    for tar in web_job.result.layout.shards.glob("*.tar"):
        import tarfile

        with tarfile.open(str(tar.path)) as archive:
            for member in archive.getmembers():
                assert re.match(r"^\d+\.(jpg|json|txt)$", member.name), member.name
    assert web_job.records["path-traversal"]["web_caption"] == "../../../etc/passwd\x00/../shards/00000.tar"


def test_all_web_cases_together_every_row_once_and_the_fates_add_up(web_job):
    """The accounting invariant over every web case at once: the job finished, every input row is one
    output row, the manifest's counts are the rows' fates, and the tars hold exactly the kept rows."""
    manifest = web_job.result.manifest
    assert web_job.result.complete
    records = read_records(web_job.result.layout)
    assert len(records) == len(web_job.urls) == manifest["input_rows"] == len(ALL)
    assert Counter(r["url"] for r in records) == Counter(web_job.urls)
    assert len({r["key"] for r in records}) == len(records)
    counts = Counter(r["status"] for r in records)
    assert {fate: n for fate, n in manifest["counts"].items() if n} == dict(counts)
    assert sum(manifest["counts"].values()) == manifest["input_rows"]
    kept = {r["key"] for r in records if r["status"] == Fate.KEPT}
    assert set(_stored_images(web_job.result)) == kept
    expected = Counter(c.case.outcome for c in ALL)
    assert sum(counts[fate] for fate in SCORED_FATES) == expected.pop(SCORED)
    assert {fate: counts[fate] for fate in expected} == dict(expected)


# --- the guard on its own: what the pipeline's earlier checks never let it see ---------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_connection_itself_is_refused_for_a_denied_address_even_without_a_url_check(scheme):
    """A URL that passed the list's check (or a name whose DNS answer changed since) still cannot
    connect: the address is checked where the socket is opened, before any TLS handshake."""
    with StaticSite({"/secret.jpg": _ok(JPEG)}, host=DENIED_HOST) as denied:
        guard = FetchGuard(NetworkPolicy(True, (), (f"{DENIED_HOST}/32",)), MAX_BODY_BYTES, TIMEOUT_S)
        url = denied.url("/secret.jpg").replace("http:", f"{scheme}:")
        with pytest.raises(
            Exception, match=f"blocked: host {DENIED_HOST}: {DENIED_HOST} is in denied network"
        ):
            guard.opener().open(url, timeout=TIMEOUT_S)
        assert denied.total_hits == 0


def test_a_name_is_checked_by_the_addresses_it_resolves_to_when_connecting():
    """The DNS path of the same check: `localhost` is looked up as the socket is opened (a rebinding
    name would be caught here, whatever it resolved to when the list was checked)."""
    with StaticSite({"/a.jpg": _ok(JPEG)}) as site:
        url = site.url("/a.jpg").replace("127.0.0.1", "localhost")
        guard = FetchGuard(NetworkPolicy(True, (), ("127.0.0.0/8", "::1/128")), MAX_BODY_BYTES, TIMEOUT_S)
        with pytest.raises(Exception, match=r"blocked: host localhost: .* is in denied network"):
            guard.opener().open(url, timeout=TIMEOUT_S)
        assert site.total_hits == 0
        allowed = FetchGuard(NetworkPolicy(True), MAX_BODY_BYTES, TIMEOUT_S)
        with allowed.opener().open(site.url("/a.jpg"), timeout=TIMEOUT_S) as response:
            assert response.read() == JPEG


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "data:image/png;base64,AAAA"])
def test_the_guarded_opener_speaks_http_and_https_only(url):
    import urllib.error

    guard = FetchGuard(NetworkPolicy(True), MAX_BODY_BYTES, TIMEOUT_S)
    with pytest.raises(urllib.error.URLError, match="unknown url type"):
        guard.opener().open(url, timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    "body",
    [
        JPEG,
        PNG,
        _half_transparent_png(),
        _gif_first_red_then_green(),
        _encode(SCENE[0], "WEBP"),
        PNG[: len(PNG) // 2],
    ],
    ids=["jpeg", "png", "png-alpha", "gif", "webp", "truncated-png"],
)
def test_what_needs_no_fixing_reaches_the_decoder_as_it_came_and_undecoded(body, monkeypatch):
    """Only bombs, EXIF-turned and 16-bit images are touched, and the common case costs a header
    parse: Pillow never decodes it (a truncated PNG shows it: decoding it would raise)."""
    from pipeline.ingest.image_guard import ImageGuard

    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    assert ImageGuard(MAX_IMAGE_PIXELS).prepare(body) is body
    assert decoded == []


def test_size_rules_give_their_own_fate_and_every_image_its_original_size(tmp_path, web, tiny_models):
    """`download.min_image_size` and `max_aspect_ratio` refuse from the header, with the size and the
    setting in the row's error; a decoded image keeps its size before the resize; a filtered row says
    how close its best caption came."""
    site, _ = web
    png = (("Content-Type", "image/png"),)
    bodies = {
        "/size/dot.png": png_bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "RGB"),
        "/size/strip.png": png_bytes(Image.new("RGB", (120, 20), (9, 90, 9)), "RGB"),
        "/size/ok.png": png_bytes(render_scene(970, size=96)[0], "RGB"),
    }
    for path, body in bodies.items():
        site.add(path, Route(200, body, png))
    rows = [(site.url(path), "a picture") for path in bodies]
    sections = {"download": {"min_image_size": 8, "max_aspect_ratio": 3}, "filter": {"threshold": 1.0}}
    result = run_job(make_spec(tmp_path, rows, tiny_models, **sections), log=lambda _: None)
    by_name = {r["url"].rsplit("/", 1)[1]: r for r in read_records(result.layout)}
    assert (by_name["dot.png"]["status"], by_name["dot.png"]["error"]) == (
        "wrong_size",
        "size rules: 1x1: its shorter side is under download.min_image_size (8)",
    )
    assert (by_name["strip.png"]["status"], by_name["strip.png"]["error"]) == (
        "wrong_size",
        "size rules: 120x20: aspect ratio 6.00 over download.max_aspect_ratio (3)",
    )
    ok = by_name["ok.png"]
    assert (ok["status"], ok["original_width"], ok["original_height"], ok["width"]) == (
        "filtered",
        96,
        96,
        64,
    )
    assert re.fullmatch(r"best caption ITM 0\.\d{3} < filter\.threshold 1 \((web|synthetic)\)", ok["error"])
    assert result.manifest["counts"][Fate.WRONG_SIZE] == 2
    assert (result.layout.shards / "00000_stats.json").read_json()["failed_to_resize"] == 2
