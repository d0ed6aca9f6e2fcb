"""Tests for pipeline.synthetic.sample_web: real HTTP over 127.0.0.1, and the hostile cases' expected fates checked
against img2dataset's own fetch and decode code (so the table in hostile_pairs cannot drift from reality)."""

from __future__ import annotations

import io
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic.sample_web import (
    Route,
    SamplePair,
    StaticSite,
    good_pairs,
    hostile_pairs,
    jpeg_bytes,
    png_bytes,
    render_scene,
    sample_web,
)
from pipeline.synthetic.world import parse_caption

# img2dataset's disallowed-directive default (img2dataset.main), passed explicitly to download_image.
NOAI_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


def _img2dataset() -> tuple[Any, Any]:
    """Import lazily: img2dataset imports albumentations, which phones PyPI on import unless told not to."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import download_image
    from img2dataset.resizer import Resizer

    resizer = Resizer(
        image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=False, upscale_interpolation="lanczos",
        downscale_interpolation="area", encode_quality=95, encode_format="jpg", skip_reencode=False,
        disable_all_reencoding=False, min_image_size=0, max_image_area=float("inf"),
        max_aspect_ratio=float("inf"),
    )  # fmt: skip
    return download_image, resizer


@pytest.fixture(scope="module")
def hostile() -> list[SamplePair]:
    return hostile_pairs()


@pytest.fixture(scope="module")
def hostile_site(hostile: list[SamplePair]) -> Iterator[StaticSite]:
    with StaticSite({p.path: p.route for p in hostile}) as site:
        yield site


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read(), err.headers


def test_route_status_body_headers_arrive_as_set() -> None:
    routes = {
        "/a.jpg": Route(200, b"\xff\xd8hello", (("Content-Type", "image/jpeg"), ("X-Custom", "yes"))),
        "/teapot": Route(418, b"short and stout", (("Content-Type", "text/plain"),)),
    }
    with StaticSite(routes) as site:
        assert site.base_url.startswith("http://127.0.0.1:")
        assert site.url("/a.jpg") == site.url("a.jpg") == site.base_url + "/a.jpg"
        status, body, headers = _get(site.url("/a.jpg"))
        assert (status, body) == (200, b"\xff\xd8hello")
        assert headers["Content-Type"] == "image/jpeg"
        assert headers["X-Custom"] == "yes"
        assert headers["Content-Length"] == str(len(body))
        status, body, headers = _get(site.url("/teapot"))
        assert (status, body, headers["Content-Type"]) == (418, b"short and stout", "text/plain")


def test_unknown_path_404_and_hit_counting() -> None:
    with StaticSite({"/x": Route(body=b"x")}) as site:
        assert site.total_hits == 0
        assert _get(site.url("/nope"))[0] == 404
        for _ in range(2):
            assert _get(site.url("/x"))[1] == b"x"
        assert _get(site.url("/x?cache=bust"))[1] == b"x"  # query strings do not change the route
        assert (site.hits("/x"), site.hits("/nope"), site.hits("/never")) == (3, 1, 0)
        assert site.total_hits == 4
        site.add("/late", Route(201, b"added while running"))
        assert _get(site.url("/late"))[:2] == (201, b"added while running")


def test_stall_lets_client_time_out_and_stop_does_not_hang() -> None:
    site = StaticSite({"/slow": Route(body=b"late", stall_s=1.0)}).start()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _get(site.url("/slow"), timeout=0.2)
    t0 = time.monotonic()
    site.stop()
    assert time.monotonic() - t0 < 1.0
    site.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = site.base_url


def test_render_scene_deterministic_per_seed_and_varied() -> None:
    img_a, cap_a = render_scene(7)
    img_b, cap_b = render_scene(7)
    assert cap_a == cap_b
    assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert img_a.size == (96, 96) and img_a.mode == "RGB"
    scenes = [render_scene(s, size=48) for s in range(12)]
    assert len({cap for _, cap in scenes}) > 6
    assert len({np.asarray(img).tobytes() for img, _ in scenes}) == 12
    for img, cap in scenes:
        assert img.size == (48, 48)
        assert parse_caption(cap).shape is not None and parse_caption(cap).background is not None


def test_pairs_are_deterministic_and_well_formed() -> None:
    web = sample_web(5, seed=3)
    assert web == sample_web(5, seed=3)
    assert [p.path for p in web[:5]] == [f"/img/{i:04d}.jpg" for i in range(5)]
    assert len({p.path for p in web}) == len(web)
    assert web[5:] == hostile_pairs(3)
    assert good_pairs(2, seed=1) != good_pairs(2, seed=0)
    assert {p.expected for p in web} == {"ok", "download_failed", "decode_failed", "blocked"}
    for p in good_pairs(3):
        assert p.expected == "ok" and p.caption
        assert Image.open(io.BytesIO(p.route.body)).format == "JPEG"


def test_encoders_produce_requested_modes() -> None:
    img, _ = render_scene(1)
    for mode in ("RGB", "L", "CMYK"):
        assert Image.open(io.BytesIO(jpeg_bytes(img, mode=mode))).mode == mode
    assert Image.open(io.BytesIO(png_bytes(img))).mode == "RGBA"
    wide = Image.open(io.BytesIO(png_bytes(img, mode="I;16")))
    assert wide.mode.startswith("I") and np.asarray(wide).max() > 255  # truly 16-bit, not 8-bit widened


def test_hostile_ok_cases_decode_with_pil_and_img2dataset(hostile: list[SamplePair]) -> None:
    _, resizer = _img2dataset()
    oks = [p for p in hostile if p.expected == "ok"]
    assert len(oks) >= 5
    for p in oks:
        with Image.open(io.BytesIO(p.route.body)) as im:
            im.load()
            assert im.size[0] >= 1
        *_, err = resizer(io.BytesIO(p.route.body))
        assert err is None, (p.path, err)


def test_hostile_decode_failed_cases_fail_img2dataset_resizer(hostile: list[SamplePair]) -> None:
    _, resizer = _img2dataset()
    bad = [p for p in hostile if p.expected == "decode_failed"]
    assert any("truncated" in p.path for p in bad)
    for p in bad:
        img_str, *_, err = resizer(io.BytesIO(p.route.body))
        assert img_str is None and err, p.path


def test_every_case_meets_its_fate_through_img2dataset_over_http(
    hostile: list[SamplePair], hostile_site: StaticSite
) -> None:
    """End to end over the socket, with img2dataset's own urllib fetch: the family each case claims."""
    download_image, resizer = _img2dataset()
    for p in hostile + good_pairs(2):
        hostile_site.add(p.path, p.route)
        _, stream, dl_err = download_image((0, hostile_site.url(p.path)), 5, None, NOAI_DIRECTIVES)
        if p.expected == "blocked":
            assert stream is None and "X-Robots-Tag" in dl_err, p.path
        elif p.expected == "download_failed":
            assert stream is None and dl_err and "X-Robots-Tag" not in dl_err, p.path
        else:
            assert dl_err is None and stream is not None, (p.path, dl_err)
            *_, err = resizer(stream)
            assert (err is None) == (p.expected == "ok"), (p.path, err)
        assert hostile_site.hits(p.path) >= 1
