"""A job whose URL list and output are on S3 (moto's server on 127.0.0.1, through s3fs), run on a real
local Ray, read back with pyarrow and tarfile through s3fs, and compared with the same job written to a
local directory: the object store changes where the bytes go, never which bytes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from pipeline.cli import main
from pipeline.core.storage import Location
from pipeline.inspect.loader import CapFiltDataset
from pipeline.job.rethreshold import rethreshold
from pipeline.job.runner import run_job
from pipeline.output.job_output import JobOutput, OutputError
from pipeline.output.shard_writer import sample_record
from pipeline.perf.job_run import run_watched
from pipeline.spec.config import JobSpec, SpecError, spec_from_dict
from pipeline.spec.fates import Fate
from pipeline.spec.layout import RETRY_DIR, OutputLayout
from pipeline.synthetic.sample_web import Route, jpeg_bytes, render_scene
from tests.conftest import make_spec, read_records
from tests.s3 import new_bucket, s3, upload

COMMAND_TIMEOUT_S = 300  # a job here takes under a minute
pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]  # slow: moto's S3 and whole jobs on it


@pytest.fixture(scope="module", autouse=True)
def own_ray_per_command() -> Iterator[None]:
    """The commands that stream a job run as processes of their own (`run_watched`, `capfilt`), each
    with a Ray of its own (`RAY_ADDRESS=local`), as users run them. In this module's process, Ray
    stalled four times in whole-suite runs (2026-12-06 and -07: an actor's readiness never delivered,
    a stream's first chunk never came, a `ray.shutdown()` blocked in Ray's own GCS subscriber), never
    in shorter runs; a stall in a process of its own ends at the timeout and fails one test, where
    one in pytest's process hung the run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", "local")
        yield


def capfilt(*args: str) -> subprocess.CompletedProcess:
    """`capfilt ARGS` in a process of its own (a command other than `run`: `run_watched` runs jobs)."""
    command = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def run_in_own_process(spec: JobSpec, where: Path) -> JobOutput:
    """`capfilt run` of `spec` in its own process (`where`/job.yaml); its output."""
    run_watched(spec, where / "job.yaml", timeout_s=COMMAND_TIMEOUT_S)
    return JobOutput.open(spec.output.path)


def s3_records(prefix: str) -> dict[str, dict]:
    """Every output row under s3://`prefix`, read with pyarrow through s3fs, by key."""
    fs = s3()
    rows = [
        r
        for p in sorted(fs.glob(f"{prefix}/shards/*.parquet"))
        for r in pq.read_table(p, filesystem=fs).to_pylist()
    ]
    return {r["key"]: r for r in rows}


def s3_tar_members(prefix: str) -> dict[str, bytes]:
    """Every member of the output tars under s3://`prefix`, read with tarfile through s3fs."""
    fs = s3()
    found = {}
    for path in sorted(fs.glob(f"{prefix}/shards/*.tar")):
        with fs.open(path, "rb") as stream, tarfile.open(fileobj=stream) as archive:
            for member in archive:
                found[member.name] = archive.extractfile(member).read()
    return found


def s3_spec(local_spec, url_list: str, out: str):
    raw = local_spec.to_dict()
    raw["input"]["url_list"] = url_list
    raw["output"]["path"] = out
    return spec_from_dict(raw)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, web, tiny_models):
    """The same job twice: URL list and output on S3 (run with `capfilt run`), and on local disk."""
    site, pairs = web
    site.add("/s3/missing.jpg", Route(status=404))
    rows = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:20]
    rows += [(site.url("/s3/missing.jpg"), "gone"), ("ftp://127.0.0.1/x.jpg", "blocked")]
    tmp = tmp_path_factory.mktemp("s3job")
    keep = {"shard_size": 8, "keep_downloads": True}  # rethreshold and retry-failed run on both
    local = make_spec(tmp, rows, tiny_models, out="local", output=keep)
    bucket = new_bucket()
    url_list = upload(tmp / "urls.parquet", f"s3://{bucket}/lists/urls.parquet")
    remote = s3_spec(local, url_list, f"s3://{bucket}/job")
    (tmp / "remote").mkdir()
    run_in_own_process(remote, tmp / "remote")
    local_result = run_in_own_process(local, tmp)
    return remote, local, local_result, rows, tmp


def test_the_output_on_s3_reads_back_with_pyarrow_and_tarfile(jobs):
    remote, _, _, rows, _ = jobs
    prefix = remote.output.path.removeprefix("s3://")
    manifest = json.loads(s3().cat(f"{prefix}/manifest.json"))
    records = s3_records(prefix)
    assert manifest["complete"] and manifest["input_rows"] == len(rows) == len(records)
    assert manifest["counts"] == {f.value: sum(r["status"] == f for r in records.values()) for f in Fate}
    assert manifest["counts"][Fate.DOWNLOAD_FAILED] == 1 and manifest["counts"][Fate.BLOCKED] == 1
    assert manifest["spec"]["output"]["path"] == remote.output.path  # the URI, not made "absolute"
    assert [s["status"] for s in manifest["shards"]] == ["done"] * 3
    members = s3_tar_members(prefix)
    kept = {k for k, r in records.items() if r["status"] == Fate.KEPT}
    assert Counter(name.partition(".")[0] for name in members) == Counter({k: 3 for k in kept})
    for key in kept:
        assert members[f"{key}.txt"].decode() == records[key]["caption"]
        assert json.loads(members[f"{key}.json"]) == json.loads(json.dumps(sample_record(records[key])))
    every = s3().find(prefix)
    assert not [p for p in every if ".tmp" in p or "/_tmp" in p], every  # objects are written whole


def test_the_s3_output_equals_the_local_one_byte_for_byte(jobs):
    remote, _, local_result, _, _ = jobs
    prefix = remote.output.path.removeprefix("s3://")
    local_records = {r["key"]: r for r in read_records(local_result.layout)}
    assert s3_records(prefix) == local_records
    fs = s3()
    for path in local_result.layout.shards.glob("*"):
        if not path.name.endswith(".done.json"):  # the report holds the time it was written
            assert fs.cat(f"{prefix}/shards/{path.name}") == path.read_bytes(), path.name


def test_a_second_run_on_s3_finds_every_shard_done(jobs, web):
    remote, *_ = jobs
    site, _ = web
    prefix = remote.output.path.removeprefix("s3://")
    before = {p: s3().info(p)["LastModified"] for p in s3().glob(f"{prefix}/shards/*")}
    hits = site.hits("/s3/missing.jpg")
    time.sleep(1.1)  # S3 times have a one-second resolution
    logs: list[str] = []
    again = run_job(remote, log=logs.append)
    assert again.complete
    assert any("3 already done, 0 to caption and filter" in line for line in logs), logs
    assert {p: s3().info(p)["LastModified"] for p in s3().glob(f"{prefix}/shards/*")} == before
    assert site.hits("/s3/missing.jpg") == hits  # img2dataset's incremental mode found its shards on S3


def test_inspect_reads_the_s3_output_as_it_reads_a_local_one(jobs, capsys):
    remote, _, local_result, _, tmp = jobs
    assert main(["inspect", remote.output.path, "--html", str(tmp / "report.html")]) == 0
    on_s3 = capsys.readouterr().out
    assert main(["inspect", str(local_result.layout.root)]) == 0
    on_disk = capsys.readouterr().out
    assert on_s3.startswith(f"capfilt output {remote.output.path} (complete)")
    assert on_s3.split("\n", 1)[1].removesuffix(f"\n\nreport: {tmp / 'report.html'}\n") == on_disk.split(
        "\n", 1
    )[1].rstrip("\n")
    page = (tmp / "report.html").read_text()
    assert "data:image/jpeg;base64," in page  # thumbnails read from the raw shards on S3


def test_the_loader_reads_the_shards_from_s3(jobs):
    remote, _, local_result, _, _ = jobs
    from_s3 = {
        record["key"]: caption for _, caption, record in CapFiltDataset(remote.output.path, with_record=True)
    }
    local = {
        record["key"]: caption
        for _, caption, record in CapFiltDataset(local_result.layout.root, with_record=True)
    }
    assert from_s3 == local and from_s3
    workers = DataLoader(CapFiltDataset(remote.output.path, with_record=True), batch_size=None, num_workers=2)
    assert {record["key"]: caption for _, caption, record in workers} == local  # forked workers open S3 too
    one_tar = f"{remote.output.path}/shards/00000.tar"
    assert {r["key"] for _, _, r in CapFiltDataset(one_tar, with_record=True)} == {
        k for k in local if k.startswith("00000")
    }


def test_rethreshold_from_s3_to_s3_equals_the_local_rethreshold(jobs, tmp_path):
    remote, _, local_result, _, _ = jobs
    new = remote.output.path.rsplit("/", 1)[0] + "/strict"
    assert main(["rethreshold", remote.output.path, "--threshold", "0.56", "--out", new]) == 0
    assert (
        main(
            [
                "rethreshold",
                str(local_result.layout.root),
                "--threshold",
                "0.56",
                "--out",
                str(tmp_path / "strict"),
            ]
        )
        == 0
    )
    output = JobOutput.open(new)
    assert output.manifest["complete"] and output.threshold == 0.56
    assert output.manifest["rethresholded_from"]["path"] == remote.output.path
    assert s3_records(new.removeprefix("s3://")) == {
        r["key"]: r for r in read_records(JobOutput.open(tmp_path / "strict").layout)
    }
    source = sorted(
        p.rpartition("/")[2] for p in s3().glob(f"{remote.output.path.removeprefix('s3://')}/downloads/*")
    )
    assert sorted(p.name for p in output.layout.downloads.files()) == source  # server-side copies
    with pytest.raises(OutputError, match="not empty"):
        rethreshold(JobOutput.open(remote.output.path), 0.4, new)
    logs: list[str] = []
    assert run_job(output.spec, log=logs.append).complete  # NEW is a complete output of its spec
    assert any(" 0 to caption and filter" in line for line in logs), logs


def test_retry_failed_on_s3_folds_the_rows_in(tmp_path, web, tiny_models):
    site, pairs = web
    body = jpeg_bytes(render_scene(700)[0])
    site.add("/s3/flaky.jpg", Route(status=503))
    good = [(site.url(p.path), p.caption) for p in pairs if p.expected == "ok"][:3]
    rows = [*good, (site.url("/s3/flaky.jpg"), "flaky")]
    local = make_spec(tmp_path, rows, tiny_models, output={"shard_size": 2, "keep_downloads": True})
    bucket = new_bucket()
    remote = s3_spec(
        local, upload(tmp_path / "urls.parquet", f"s3://{bucket}/urls.parquet"), f"s3://{bucket}/job"
    )
    first = run_in_own_process(remote, tmp_path)
    assert first.manifest["counts"][Fate.DOWNLOAD_FAILED] == 1
    site.add("/s3/flaky.jpg", Route(body=body, headers=(("Content-Type", "image/jpeg"),)))
    retried = capfilt("retry-failed", remote.output.path)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "retried 1 rows whose download had failed" in retried.stdout
    records = s3_records(f"{bucket}/job")
    assert len(records) == len(rows)
    flaky = next(r for r in records.values() if r["url"] == site.url("/s3/flaky.jpg"))
    assert flaky["status"] in (Fate.KEPT, Fate.FILTERED)
    manifest = JobOutput.open(remote.output.path).manifest
    assert manifest["complete"] and manifest["counts"][Fate.DOWNLOAD_FAILED] == 0
    assert manifest["counts"] == {f.value: sum(r["status"] == f for r in records.values()) for f in Fate}
    assert not s3().exists(f"{bucket}/job/{RETRY_DIR}")


def test_missing_or_unknown_locations_are_one_line_errors(tmp_path, tiny_models, capsys):
    bucket = new_bucket()
    spec = make_spec(tmp_path, [("http://127.0.0.1/a.jpg", "a")], tiny_models)
    raw = spec.to_dict()
    raw["input"]["url_list"] = f"s3://{bucket}/no-such-list.parquet"
    with pytest.raises(SpecError, match=r"input\.url_list: no such file: s3://"):
        spec_from_dict(raw)
    raw["input"]["url_list"] = "nosuchscheme://x/urls.parquet"
    with pytest.raises(SpecError, match=r"input\.url_list: cannot open nosuchscheme://"):
        spec_from_dict(raw)
    assert main(["inspect", f"s3://{bucket}/nothing"]) == 2
    assert f"s3://{bucket}/nothing: no such directory" in capsys.readouterr().err


def test_uris_stay_as_they_are_and_local_paths_are_resolved(tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = make_spec(tmp_path, [], tiny_models)
    relative = dataclasses.replace(spec, output=dataclasses.replace(spec.output, path="out"))
    assert relative.with_absolute_paths().output.path == str(tmp_path.resolve() / "out")
    uri = dataclasses.replace(spec, output=dataclasses.replace(spec.output, path="s3://b/job"))
    assert uri.with_absolute_paths().output.path == "s3://b/job"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_write_leaves_nothing_and_a_finished_one_the_whole_file(where, tmp_path):
    root = Location.of(str(tmp_path) if where == "local" else f"s3://{new_bucket()}/w")
    target = root / "file.bin"
    root.mkdir()
    with pytest.raises(RuntimeError), target.writing() as stream:
        stream.write(b"half")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(root.iterdir()) == []
    with target.writing() as stream:
        stream.write(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in root.iterdir()] == ["file.bin"]
    copy = root / "copy.bin"
    target.link_to(copy)
    assert copy.read_bytes() == b"whole"
    if where == "local":
        assert Path(copy).stat().st_ino == Path(target).stat().st_ino  # a hard link


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_bracket_in_the_directory_is_a_name_not_a_pattern(where, tmp_path):
    base = str(tmp_path) if where == "local" else f"s3://{new_bucket()}"
    layout = OutputLayout(f"{base}/run[1]")
    layout.downloads.mkdir()
    for name in ("00000_stats.json", "00001_stats.json", "00000.tar"):
        (layout.downloads / name).write_text("{}")
    assert layout.downloaded_shards() == ["00000", "00001"]
    assert [p.name for p in layout.downloads.glob("*.tar")] == ["00000.tar"]


def test_rethreshold_never_deletes_a_bucket_or_a_prefix_it_did_not_write(jobs):
    remote = jobs[0]
    source = JobOutput.open(remote.output.path)
    bucket = new_bucket()
    with pytest.raises(OutputError, match="name a prefix inside the bucket"):
        rethreshold(source, 0.4, f"s3://{bucket}")
    assert s3().exists(bucket)
    foreign = Location.of(f"s3://{bucket}/data/shards/someone-elses.tar")
    foreign.write_bytes(b"not capfilt's")
    with pytest.raises(OutputError, match="not empty"):
        rethreshold(source, 0.4, f"s3://{bucket}/data")  # capfilt's names, but not its marker
    assert foreign.read_bytes() == b"not capfilt's"
