"""The job as a stream, shard by shard, on a real local Ray and a real HTTP server on 127.0.0.1:
shards are committed while later ones still download, no more than `resources.shards_in_flight`
are between "download started" and "committed" at once, a hung download is killed and tried again,
and a job killed between a shard's download and its commit resumes to the same output."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from pipeline.cli import main
from pipeline.curate.capfilt_stage import CapFiltStage
from pipeline.ingest import list_readers, url_list
from pipeline.job import runner
from pipeline.job.console import Console
from pipeline.job.runner import run_job
from pipeline.spec.fates import Fate
from pipeline.spec.layout import OutputLayout
from pipeline.synthetic.sample_web import Route, StaticSite, jpeg_bytes, render_scene
from tests.conftest import make_spec, read_records

pytestmark = pytest.mark.usefixtures("ray_local")

SHARD = 4


class SlowStage(CapFiltStage):
    """The tiny models, a second slower per chunk: a GPU that cannot keep up with the web."""

    def __call__(self, chunk):
        time.sleep(1.0)
        return super().__call__(chunk)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors unpickle it by value


@pytest.fixture
def shard_site():
    """8 shards of 4 images each, one path per row, so that each request tells which shard it is for."""
    jpeg = (("Content-Type", "image/jpeg"),)  # a picture each: none is a copy that dedup would drop
    routes = {
        f"/s{i:03d}.jpg": Route(body=jpeg_bytes(render_scene(100 + i)[0]), headers=jpeg) for i in range(32)
    }
    with StaticSite(routes) as site:
        yield site


def shard_job(tmp_path, rows, models, out: str = "out", **sections):
    """A job over `rows` in shards of `SHARD` rows."""
    return make_spec(tmp_path, rows, models, out=out, **{"output": {"shard_size": SHARD}, **sections})


def shard_timeline(site: StaticSite, layout, shards: int) -> list[tuple[float, float]]:
    """(first request, commit) per shard: `time.time()` of the server's first request for one of the
    shard's images, and of the shard's done marker."""
    timeline = []
    for s in range(shards):
        started = min(site.first_hit(f"/s{i:03d}.jpg") for i in range(s * SHARD, (s + 1) * SHARD))
        committed = os.stat(layout.shard_report(f"{s:05d}")).st_mtime
        timeline.append((started, committed))
    return timeline


def test_shards_commit_while_later_ones_download_and_never_more_than_the_bound(
    tmp_path, shard_site, tiny_models
):
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), f"row {i}") for i in range(32)]
    bound = {"shards_in_flight": 2, "download_tasks": 1}
    spec = shard_job(tmp_path, rows, tiny_models, captioner={"batch_size": 4}, resources=bound)
    result = run_job(spec, log=lambda _: None, stage_type=SlowStage)
    assert result.complete and result.manifest["counts"][Fate.DOWNLOAD_FAILED] == 0

    timeline = shard_timeline(shard_site, result.layout, 8)
    # Streaming: the first shard is committed before the last one's download has begun.
    assert timeline[0][1] < timeline[-1][0]
    # The bound, seen from outside: when a shard's first request went out, at most 2 shards (itself
    # included) had started downloading and were not committed yet; with a slow model it is reached.
    in_flight = [sum(1 for s, c in timeline if s <= started < c) for started, _ in timeline]
    assert max(in_flight) == 2
    assert result.manifest["timings"]["shards_in_flight"] == {"limit": 2, "peak": 2}
    assert 0 < result.manifest["timings"]["first_commit_s"] < result.manifest["timings"]["caption_filter_s"]


def test_a_hung_download_is_killed_and_tried_again(tmp_path, shard_site, tiny_models):
    body = jpeg_bytes(render_scene(6)[0])
    shard_site.add("/hang.jpg", Route(body=body, headers=(("Content-Type", "image/jpeg"),), stall_s=120))

    def answer_after_the_first_request() -> None:
        while shard_site.hits("/hang.jpg") == 0:
            time.sleep(0.05)
        shard_site.add("/hang.jpg", Route(body=body, headers=(("Content-Type", "image/jpeg"),)))

    threading.Thread(target=answer_after_the_first_request, daemon=True).start()
    rows = [
        (shard_site.url("/hang.jpg"), "hang"),
        *((shard_site.url(f"/s{i:03d}.jpg"), "x") for i in range(7)),
    ]
    deadline = {"download_deadline_s": 20, "download_attempts": 2}
    spec = shard_job(tmp_path, rows, tiny_models, download={"timeout": 300}, resources=deadline)
    result = run_job(spec, log=lambda _: None)
    assert result.complete, result.manifest["shards"]
    assert result.manifest["counts"][Fate.DOWNLOAD_FAILED] == 0
    assert shard_site.hits("/hang.jpg") == 2
    assert len(read_records(result.layout)) == 8


def test_a_download_that_keeps_failing_fails_its_shard_and_the_rest_finish(tmp_path, shard_site, tiny_models):
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), "x") for i in range(8)]
    spec = shard_job(
        tmp_path, rows, tiny_models, resources={"download_deadline_s": 1e-3, "download_attempts": 2}
    )
    result = run_job(spec, log=lambda _: None)
    assert not result.complete
    failed = [s for s in result.manifest["shards"] if s["status"] == "failed"]
    assert len(failed) == 2 and all("download failed 2 times" in s["error"] for s in failed)
    assert "deadline" in failed[0]["error"]


def test_a_job_killed_between_download_and_commit_resumes_to_the_clean_output(
    tmp_path, shard_site, tiny_models
):
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), f"row {i}") for i in range(12)]
    # Downloads kept, so that taking commits away below leaves what a kill before them leaves.
    spec = shard_job(tmp_path, rows, tiny_models, output={"shard_size": SHARD, "keep_downloads": True})
    first = run_job(spec, log=lambda _: None)
    layout = first.layout
    # The state a kill leaves: shard 1 downloaded but not committed (a commit's files may be partly
    # there, never its marker), shard 2 half downloaded (img2dataset writes its stats file last).
    layout.shard_report("00001").unlink()
    layout.shard_tar("00001").unlink()
    for name in ("00002.done.json", "00002.tar", "00002.parquet"):
        (layout.shards / name).unlink()
    layout.raw_stats("00002").unlink()
    layout.raw_tar("00002").write_bytes(layout.raw_tar("00002").read_bytes()[:1000])
    hits = {i: shard_site.hits(f"/s{i:03d}.jpg") for i in range(12)}

    second = run_job(spec, log=lambda _: None)
    assert second.complete and second.manifest["counts"] == first.manifest["counts"]
    refetched = {i for i in range(12) if shard_site.hits(f"/s{i:03d}.jpg") > hits[i]}
    assert refetched == set(range(8, 12))  # shard 2 only: shard 1's raw download was reused
    clean = run_job(shard_job(tmp_path, rows, tiny_models, out="clean"), log=lambda _: None)
    for name in ("00000", "00001", "00002"):
        assert pq.read_table(layout.shard_parquet(name)).equals(
            pq.read_table(clean.layout.shard_parquet(name))
        )


def test_by_default_a_committed_shard_leaves_no_raw_images(tmp_path, shard_site, tiny_models, capsys):
    refused = ("http://127.0.0.1:9/refused.jpg", "no server")  # a failed row, for retry-failed
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), f"row {i}") for i in range(11)] + [refused]
    spec = shard_job(tmp_path, rows, tiny_models)
    result = run_job(spec, log=lambda _: None)
    keep = {"shard_size": SHARD, "keep_downloads": True}
    kept = run_job(shard_job(tmp_path, rows, tiny_models, out="kept", output=keep), log=lambda _: None)
    assert sorted(p.name for p in kept.layout.downloads.glob("*.tar")) == [f"0000{i}.tar" for i in range(3)]
    layout = result.layout
    assert result.complete and result.manifest["counts"] == kept.manifest["counts"]
    assert sorted(p.name for p in layout.downloads.iterdir()) == [f"0000{i}_stats.json" for i in range(3)]
    for name in ("00000", "00001", "00002"):
        assert pq.read_table(layout.shard_parquet(name)).equals(
            pq.read_table(kept.layout.shard_parquet(name))
        )
    rethreshold = ["rethreshold", str(layout.root), "--threshold", "0.6", "--out", str(tmp_path / "t")]
    for command in (rethreshold, ["retry-failed", str(layout.root)]):
        assert main(command) == 2
        assert "output.keep_downloads: true" in capsys.readouterr().err
    # A commit made stale (a new threshold) downloads its shard again, since its images are gone.
    hits = shard_site.total_hits
    stricter = dataclasses.replace(spec, filter=dataclasses.replace(spec.filter, threshold=0.6))
    again = run_job(stricter, log=lambda _: None)
    assert again.complete and shard_site.total_hits == hits + 11


def _hold_the_last_batch(monkeypatch, rows, until) -> None:
    """Prepare the list in batches of a shard, its last batch waiting for `until()` (at most a minute)
    before its policy check: the driver's prepare thread then plainly runs beside the stream."""
    monkeypatch.setattr(list_readers, "BATCH_ROWS", SHARD)
    checked = url_list.check_urls

    def held(urls, policy):
        if urls[0] == rows[-SHARD][0]:
            deadline = time.monotonic() + 60
            while not until():
                assert time.monotonic() < deadline, "the stream never got ahead of the prepare"
                time.sleep(0.05)
        return checked(urls, policy)

    monkeypatch.setattr(url_list, "check_urls", held)


def test_the_first_shard_is_committed_while_the_list_is_still_being_prepared(
    tmp_path, shard_site, tiny_models, monkeypatch
):
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), f"row {i}") for i in range(32)]
    spec = shard_job(tmp_path, rows, tiny_models)
    layout = OutputLayout(spec.output.path)
    _hold_the_last_batch(monkeypatch, rows, until=lambda: layout.shard_report("00000").exists())
    result = run_job(spec, log=lambda _: None)
    assert result.complete and len(read_records(layout)) == 32
    prepared = layout.prepared_input / "_prepared.json"
    assert os.stat(layout.shard_report("00000")).st_mtime <= os.stat(prepared).st_mtime
    assert result.manifest["duplicate_urls"] == 0  # the record, read once the list was prepared


def test_a_prepare_that_fails_mid_stream_fails_the_shards_it_held_and_the_job_resumes(
    tmp_path, shard_site, tiny_models, monkeypatch
):
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), f"row {i}") for i in range(32)]
    spec = shard_job(tmp_path, rows, tiny_models)
    layout = OutputLayout(spec.output.path)

    def fail_once_shard_0_is_committed() -> bool:
        if layout.shard_report("00000").exists():
            raise OSError("the list's disk went away")
        return False

    _hold_the_last_batch(monkeypatch, rows, until=fail_once_shard_0_is_committed)
    with pytest.raises(OSError, match="the list's disk went away"):
        run_job(spec, log=lambda _: None)
    manifest = layout.manifest.read_json()
    failed = [s for s in manifest["shards"] if s["status"] == "failed"]
    assert failed[-1]["shard"] == "00007" and not manifest["complete"]
    assert "the URL list could not be prepared: the list's disk went away" in failed[-1]["error"]
    assert manifest["shards"][0]["status"] == "done"

    monkeypatch.undo()
    again = run_job(spec, log=lambda _: None)
    assert again.complete and len(read_records(layout)) == 32


def test_the_manifest_tells_how_far_a_running_job_is_and_the_console_shows_it(
    tmp_path, shard_site, tiny_models, monkeypatch
):
    monkeypatch.setattr(runner._Watch, "MANIFEST_EVERY_S", 0.5)
    rows = [(shard_site.url(f"/s{i:03d}.jpg"), f"row {i}") for i in range(32)]
    spec = shard_job(
        tmp_path, rows, tiny_models, captioner={"batch_size": 4}, resources={"shards_in_flight": 2}
    )
    layout = OutputLayout(spec.output.path)
    seen, ended = [], threading.Event()

    def watch() -> None:  # what `capfilt status` reads, as often as it is rewritten
        while not ended.is_set():
            with contextlib.suppress(OSError, ValueError, KeyError):  # not written yet
                seen.append(json.loads(layout.manifest.read_text())["progress"])
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stream = io.StringIO()
    try:
        result = run_job(spec, stage_type=SlowStage, console=Console(verbose=True, stream=stream))
    finally:
        ended.set()
        watcher.join()
    midway = [p for p in seen if p and p["running"] and 0 < p["shards"]["committed"] < 8]
    assert midway, seen
    committed = [p["shards"]["committed"] for p in seen if p]
    assert committed == sorted(committed)
    assert midway[-1]["eta_s"] > 0 and midway[-1]["kept_percent"] is not None
    final = result.manifest["progress"]
    assert not final["running"] and final["eta_s"] is None
    assert final["shards"] == {"total": 8, "committed": 8, "failed": 0}
    assert final["rows_downloaded"] == final["images_scored"] == 32
    kept = result.manifest["counts"][Fate.KEPT]
    assert final["kept_percent"] == round(100 * kept / 32, 1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("capfilt: 32 input rows in 8 shards")
    assert lines[-1].startswith("capfilt: shards 8/8 committed | ")
