"""`capfilt retry-failed`: URLs that failed the first time and work now are downloaded, captioned,
filtered and folded into the output; counts stay exact and no key appears twice."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from pipeline.cli import main
from pipeline.job.rethreshold import rethreshold
from pipeline.job.retry import retry_failed
from pipeline.job.runner import run_job
from pipeline.output.job_output import JobOutput, OutputError
from pipeline.output.shard_writer import ShardWriter
from pipeline.spec.fates import Fate
from pipeline.spec.layout import RETRY_DIR
from pipeline.synthetic.sample_web import Route, jpeg_bytes, render_scene
from tests.conftest import make_spec, read_records, tar_keys

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.slow
def test_rows_that_failed_and_work_now_are_folded_in(tmp_path, web, tiny_models, capsys):
    site, pairs = web
    flaky = {f"/flaky/{i}.jpg": jpeg_bytes(render_scene(500 + i)[0]) for i in range(3)}
    for path in flaky:
        site.add(path, Route(status=503))
    good = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:9]
    rows = [
        *good[:3],
        (site.url("/flaky/0.jpg"), "flaky zero"),
        *good[3:6],
        (site.url("/flaky/1.jpg"), None),
        (site.url("/flaky/gone.jpg"), "gone for good"),
        *good[6:],
        (site.url("/flaky/2.jpg"), "flaky two"),
    ]
    spec = make_spec(
        tmp_path, rows, tiny_models, output={"shard_size": 3, "keep_downloads": True}
    )  # 4 failed: 2 retry shards
    first = run_job(spec, log=lambda _: None)
    layout = first.layout
    before = {r["key"]: r for r in read_records(layout)}
    failed = {r["url"]: r["key"] for r in before.values() if r["status"] == Fate.DOWNLOAD_FAILED}
    assert first.manifest["counts"][Fate.DOWNLOAD_FAILED] == 4 == len(failed)

    strict = rethreshold(JobOutput.open(layout.root), 0.56, tmp_path / "strict")  # made before the retry

    for path, body in flaky.items():  # the server is back
        site.add(path, Route(body=body, headers=(("Content-Type", "image/jpeg"),)))
    assert main(["retry-failed", str(layout.root)]) == 0
    out = capsys.readouterr().out
    assert "retried 4 rows whose download had failed: now" in out and "1 download_failed" in out
    # What the retry job printed is kept in OUT's log, not lost with the retry's working directory
    assert "CapFilt actor(s)" in (layout.root / "logs" / "capfilt.log").read_text()

    after = {r["key"]: r for r in read_records(layout)}
    assert sorted(after) == sorted(before)  # the same keys, each once
    for path, body in flaky.items():
        record = after[failed[site.url(path)]]
        assert record["status"] in (Fate.KEPT, Fate.FILTERED), record
        assert record["sha256"] == hashlib.sha256(body).hexdigest() and record["synthetic_itm"]
    assert after[failed[site.url("/flaky/gone.jpg")]]["status"] == Fate.DOWNLOAD_FAILED
    unchanged = [k for k in before if k not in failed.values()]
    assert all(after[k] == before[k] for k in unchanged)  # nothing else was scored again

    manifest = json.loads(layout.manifest.read_text())
    assert manifest["complete"] and sum(manifest["counts"].values()) == manifest["input_rows"] == len(rows)
    assert manifest["counts"] == {f.value: sum(r["status"] == f for r in after.values()) for f in Fate}
    assert manifest["counts"][Fate.DOWNLOAD_FAILED] == 1
    assert tar_keys(layout) == Counter(k for k, r in after.items() if r["status"] == Fate.KEPT)
    assert not (layout.root / RETRY_DIR).exists()

    # the output rethresholded before the retry still describes itself, and can be rethresholded again
    assert JobOutput.open(tmp_path / "strict").manifest["counts"] == strict["counts"]
    again_strict = rethreshold(JobOutput.open(tmp_path / "strict"), 0.5, tmp_path / "strict-again")
    assert again_strict["counts"] == first.manifest["counts"]

    # a resumed run of the same spec finds every shard done and changes nothing
    logs = []
    again = run_job(spec, log=logs.append)
    assert again.manifest["counts"] == manifest["counts"]
    assert any("0 to caption and filter" in line for line in logs), logs

    # a second retry asks only for the row that still fails
    hits = {path: site.hits(path) for path in [*flaky, "/flaky/gone.jpg"]}
    result = retry_failed(JobOutput.open(layout.root), log=lambda _: None)
    assert result.retried == 1 and result.fates[Fate.DOWNLOAD_FAILED] == 1
    assert site.hits("/flaky/gone.jpg") == hits["/flaky/gone.jpg"] + 1
    assert all(site.hits(path) == hits[path] for path in flaky)
    assert {r["key"]: r for r in read_records(layout)} == after


@pytest.mark.slow
def test_nothing_to_retry_leaves_the_output_as_it_is(tmp_path, web, tiny_models, capsys):
    site, pairs = web
    rows = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:3]
    result = run_job(make_spec(tmp_path, rows, tiny_models), log=lambda _: None)
    shards = {p.name: p.read_bytes() for p in result.layout.shards.iterdir() if not p.name.endswith(".json")}
    assert main(["retry-failed", str(result.layout.root)]) == 0
    assert "nothing to retry" in capsys.readouterr().out
    assert {
        p.name: p.read_bytes() for p in result.layout.shards.iterdir() if not p.name.endswith(".json")
    } == shards


@pytest.mark.slow
def test_an_interrupted_retry_leaves_unfinished_shards_that_a_run_finishes(
    tmp_path, web, tiny_models, monkeypatch
):
    site, pairs = web
    body = jpeg_bytes(render_scene(600)[0])
    site.add("/flaky/late.jpg", Route(status=503))
    good = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:5]
    # shard 00000: a refused connection and 3 pictures; shard 00001: 2 pictures and the late one
    rows = [("http://127.0.0.1:9/refused.jpg", "no server"), *good, (site.url("/flaky/late.jpg"), "late")]
    spec = make_spec(tmp_path, rows, tiny_models, output={"shard_size": 4, "keep_downloads": True})
    layout = run_job(spec, log=lambda _: None).layout
    site.add("/flaky/late.jpg", Route(body=body, headers=(("Content-Type", "image/jpeg"),)))

    real_write = ShardWriter.write

    def dies_on_the_second_shard(writer, shard, scores, duplicates):
        if shard == "00001":
            layout.shard_report(shard).unlink(missing_ok=True)  # as the real write starts
            raise KeyboardInterrupt
        return real_write(writer, shard, scores, duplicates)

    monkeypatch.setattr(ShardWriter, "write", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        retry_failed(JobOutput.open(layout.root), log=lambda _: None)
    monkeypatch.undo()
    output = JobOutput.open(layout.root)
    assert [s.status for s in output.shards()] == ["done", "pending"]  # not "done" with stale counts
    with pytest.raises(OutputError, match="not complete"):
        retry_failed(output)

    finished = run_job(spec, log=lambda _: None)  # redoes shard 00001 from its patched raw shard
    records = {r["url"]: r for r in read_records(layout)}
    assert finished.complete and sum(finished.manifest["counts"].values()) == len(rows)
    assert finished.manifest["counts"] == {
        f.value: sum(r["status"] == f for r in records.values()) for f in Fate
    }
    assert records[site.url("/flaky/late.jpg")]["status"] in (Fate.KEPT, Fate.FILTERED)
    assert records["http://127.0.0.1:9/refused.jpg"]["status"] == Fate.DOWNLOAD_FAILED
