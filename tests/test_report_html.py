"""`capfilt inspect --html`: a well-formed, self-contained page with the histogram, the retention curve,
sample cards and dropped examples, rendered in a real headless Chromium where one is installed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.inspect.inspection import inspect_output
from pipeline.inspect.report_html import write_report
from pipeline.output.job_output import JobOutput

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE_BROWSER = bool(os.environ.get("CAPFILT_REQUIRE_BROWSER"))  # set by CI: there it must not skip
ARTIFACTS = Path(os.environ.get("CAPFILT_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
HOSTILE = '<script>alert("caption")</script> & <img src=http://127.0.0.1:9/x.png> \x0b\x00 end'


@pytest.fixture(scope="module")
def report(curated_job, tmp_path_factory) -> tuple[Path, ET.Element]:
    """The report of a copy of the curated job in which one kept row's web caption is hostile HTML."""
    out = tmp_path_factory.mktemp("report") / "output"
    shutil.copytree(curated_job.layout.root, out, symlinks=True)
    parquet = JobOutput.open(out).layout.shard_parquet("00000")
    table = pq.read_table(parquet)
    rows = table.to_pylist()
    rows[0]["web_caption"] = HOSTILE
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), parquet)
    path = out.parent / "report.html"
    assert main(["inspect", str(out), "--html", str(path), "--samples", "100"]) == 0
    text = path.read_text(encoding="utf-8")
    return path, ET.fromstring(text.removeprefix("<!DOCTYPE html>\n"))  # well-formed, or this raises


def test_report_is_self_contained(report):
    path, page = report
    for element in page.iter():
        for name in ("src", "href"):
            assert element.get(name, "data:").startswith("data:"), (element.tag, element.get(name)[:80])
    text = path.read_text()
    assert "<script" not in text and "url(" not in text and "@import" not in text
    assert len(text) < 3_000_000


def test_report_has_counts_histogram_curve_samples_and_dropped_examples(report, curated_job):
    _, page = report
    images = {img.get("id"): img for img in page.iter("img")}
    assert images["histogram"].get("src").startswith("data:image/png;base64,")
    assert images["retention"].get("src").startswith("data:image/png;base64,")
    cards = [d for d in page.iter("div") if "card" in (d.get("class") or "").split()]
    kept, filtered = curated_job.manifest["counts"]["kept"], curated_job.manifest["counts"]["filtered"]
    sample_cards = cards[: kept + filtered]
    assert (
        len([c for c in cards if c.find("img") is not None]) == len(cards) > kept + filtered
    )  # every card has its image
    assert {c.get("class") for c in sample_cards} == {"card kept", "card filtered"}
    headings = [h.text for h in page.iter("h3")]
    assert f"filtered: no caption reached the threshold ({filtered} rows)" in headings
    assert any(h.startswith("kept: web caption dropped, image kept") for h in headings)
    assert "download_failed: HTTP Error 404: Not Found (1 row)" in headings
    body = ET.tostring(page, encoding="unicode")
    for fate, n in curated_job.manifest["counts"].items():
        assert re.search(rf"<td class=\"text\">{fate}</td><td>{n}</td>", body), fate
    # Rows by domain, size as downloaded and caption length: each table accounts for every row.
    assert {"Top web domains by rows", "By the web caption's length"} <= set(headings)
    for table in page.iter("table"):
        head = [th.text for th in table.iter("th")]
        if head[1:] == ["rows", "kept", "kept %"]:
            rows = [[td.text for td in tr.iter("td")] for tr in table.iter("tr")][1:]
            assert sum(int(r[1]) for r in rows) == curated_job.manifest["input_rows"], head[0]
            assert sum(int(r[2]) for r in rows) == curated_job.manifest["counts"]["kept"], head[0]
            if head[0] == "domain":
                assert rows[0][0] == "127.0.0.1"


def test_hostile_captions_are_shown_as_text(report):
    path, page = report
    visible = HOSTILE.split(" \x0b")[0]
    shown = [li for li in page.iter("li") if visible in "".join(li.itertext())]
    assert shown, "the hostile caption is not shown"
    assert HOSTILE not in path.read_text()  # only its escaped form is in the file
    assert "\ufffd\ufffd end" in "".join(shown[0].itertext())  # XML-forbidden characters replaced


def test_candidate_captions_are_marked_kept_or_dropped_by_the_threshold(report, curated_job):
    _, page = report
    threshold = curated_job.manifest["spec"]["filter"]["threshold"]
    marked = 0
    for li in page.iter("li"):
        score = li.find("span[@class='score']")
        if score is not None:
            assert ("kept" in li.get("class").split()) == (float(score.get("title")) >= threshold), (
                ET.tostring(li)
            )
            marked += 1
    assert marked > 100


@pytest.mark.skipif(
    not REQUIRE_BROWSER and (CHROMIUM is None or importlib.util.find_spec("playwright") is None),
    reason="chromium or playwright is not installed",
)
@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_errors(report):
    """Load the file in a real browser: no page errors, no request leaves the file, every image decodes.
    The screenshot is kept in test-artifacts/ for people to look at."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CAPFILT_REQUIRE_BROWSER is set but chromium is not installed"
    path, _ = report
    errors, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("request", lambda request: requests.append(request.url))
        page.goto(path.as_uri(), wait_until="load")
        broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
        total = page.evaluate("document.images.length")
        histogram_width = page.evaluate("document.getElementById('histogram').naturalWidth")
        # A 1x1 image is drawn as one pixel, not blown up to a thumbnail's size.
        blown_up = "[...document.querySelectorAll('.card img')].filter(i => i.width > i.naturalWidth).length"
        too_big = page.evaluate(blown_up)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert [r for r in requests if not r.startswith(("data:", "file:"))] == []
    assert total > 10 and broken == 0 and histogram_width == 600 and too_big == 0
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000


def test_report_of_an_output_whose_downloads_were_deleted_shows_kept_images_only(curated_job, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(curated_job.layout.root, out, symlinks=True)
    shutil.rmtree(out / "downloads")
    output = JobOutput.open(out)
    write_report(inspect_output(output, samples=200), output, tmp_path / "r.html")
    page = ET.fromstring((tmp_path / "r.html").read_text().removeprefix("<!DOCTYPE html>\n"))
    cards = [d for d in page.iter("div") if (d.get("class") or "").startswith("card")]
    for card in cards:
        assert (card.find("img") is not None) == (card.get("class") == "card kept"), card.get("class")
