"""`capfilt retry-failed OUT`: download again only the rows whose fate is `download_failed`, caption and
filter them, and fold them into OUT, so that the counts stay exact and no key appears twice.

The failed rows become the URL list of a small job run in `OUT/_retry` with the job's own download,
captioner and filter settings, through the same runner. Then every shard that had failed rows is
patched in two steps:

1. its raw shard (`downloads/NNNNN.parquet` and `.tar`) takes the retried rows' download results under
   their original keys, as if they had downloaded the first time (idempotent);
2. its output shard is written again by the job's `ShardWriter`, from the scores it already stores
   plus the retried rows' scores. No image that was already scored goes through the models again.

The writer takes the shard's done marker away before it rewrites, so a retry interrupted in step 2
leaves that shard unfinished, never "done" with stale counts: `capfilt run` then redoes it from its
patched raw shard (the retried downloads are kept), and the manifest is exact again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import InputSpec, JobSpec, OutputSpec
from pipeline.fates import Fate, count_fates
from pipeline.job_output import JobOutput, OutputError
from pipeline.layout import OutputLayout, temporary_name, write_json_atomically
from pipeline.manifest import build_manifest, check_accounting
from pipeline.shard_writer import Scores, ShardWriter, scores_from_records
from pipeline.tars import read_jpegs

RETRY_DIR = "_retry"


@dataclass(frozen=True)
class FailedRow:
    shard: str
    key: str
    url: str
    caption: str | None


@dataclass(frozen=True)
class RetriedRow:
    """A failed row after its retry, under its original key."""

    raw: dict[str, Any]  # its row of img2dataset's shard Parquet
    scores: Scores | None  # what the models said, when it downloaded and was scored
    image: bytes | None  # the downloaded image, None unless it downloaded


@dataclass(frozen=True)
class RetryResult:
    manifest: dict[str, Any]
    retried: int
    fates: dict[str, int]  # what the retried rows ended as


def retry_failed(
    output: JobOutput, address: str | None = None, log: Callable[[str], None] = print
) -> RetryResult:
    output.require_complete("retry its failed downloads")
    spec = output.spec
    failed = failed_downloads(output)
    if failed:
        log(f"capfilt: retrying {len(failed)} rows whose download failed")
        retried = _download_and_score(output, spec, failed, address, log)
        writer = ShardWriter(output.layout, spec.filter.threshold, spec.fingerprint())
        by_shard: dict[str, dict[str, RetriedRow]] = defaultdict(dict)
        for row, result in zip(failed, retried, strict=True):
            by_shard[row.shard][row.key] = result
        for shard, results in by_shard.items():
            _patch_raw_shard(output.layout, shard, results)
            stored = scores_from_records(output.read_shard(shard).to_pylist())
            writer.write(shard, stored | {key: r.scores for key, r in results.items() if r.scores})
    shutil.rmtree(output.layout.root / RETRY_DIR, ignore_errors=True)
    names = [s["shard"] for s in output.manifest["shards"]]
    reports = {n: output.layout.finished_report(n, spec.fingerprint()) for n in names}
    manifest = build_manifest(spec, output.input_rows, names, {n: r for n, r in reports.items() if r}, {})
    write_json_atomically(output.layout.manifest, manifest)
    check_accounting(manifest)
    fates = count_fates(_fates_of(output, failed))
    return RetryResult(manifest, len(failed), fates)


def failed_downloads(output: JobOutput) -> list[FailedRow]:
    """The job's download_failed rows, in shard and key order."""
    found = []
    for shard in output.done_shards():
        table = output.read_shard(shard).select(["key", "url", "caption", "status"])
        for row in table.filter(pc.equal(table["status"], Fate.DOWNLOAD_FAILED.value)).to_pylist():
            found.append(FailedRow(shard, row["key"], row["url"], row["caption"]))
    return found


def _download_and_score(
    output: JobOutput, spec: JobSpec, failed: list[FailedRow], address: str | None, log: Callable[[str], None]
) -> list[RetriedRow]:
    """Run the failed rows as a job of their own; return their results in order, under the ORIGINAL keys."""
    from pipeline.runner import run_job

    work = output.layout.root / RETRY_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    url_list = work / "urls.parquet"
    pq.write_table(
        pa.table(
            {
                "url": pa.array([r.url for r in failed], pa.string()),
                "caption": pa.array([r.caption for r in failed], pa.string()),
            }
        ),
        url_list,
    )
    retry_spec = dataclasses.replace(
        spec,
        input=InputSpec(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption"),
        output=OutputSpec(path=str(work / "output"), shard_size=spec.output.shard_size),
    )
    result = run_job(retry_spec, address=address, log=log)
    if not result.complete:
        raise OutputError(
            f"{output.layout.root}: the retry job did not complete (see {result.layout.manifest}); "
            "the output is unchanged; run retry-failed again"
        )
    layout = result.layout
    raw_rows, records, images = {}, {}, {}
    for shard in sorted(s["shard"] for s in result.manifest["shards"]):
        raw_rows.update({r["key"]: r for r in pq.read_table(layout.raw_parquet(shard)).to_pylist()})
        records.update({r["key"]: r for r in pq.read_table(layout.shard_parquet(shard)).to_pylist()})
        images.update(read_jpegs(layout.raw_tar(shard)))
    scores = scores_from_records(records.values())
    retry_keys = sorted(records)  # img2dataset's keys follow the URL list's order
    if len(retry_keys) != len(failed):
        raise RuntimeError(f"retry job wrote {len(retry_keys)} rows for {len(failed)} failed rows")
    results = []
    for row, retry_key in zip(failed, retry_keys, strict=True):
        record = records[retry_key]
        if record["url"] != row.url:
            raise RuntimeError(
                f"retry row {retry_key} is {record['url']!r}, expected {row.url!r} (key {row.key})"
            )
        raw = {**raw_rows[retry_key], "key": row.key}
        results.append(RetriedRow(raw, scores.get(retry_key), images.get(retry_key)))
    return results


def _patch_raw_shard(layout: OutputLayout, shard: str, results: dict[str, RetriedRow]) -> None:
    """Replace the retried rows of raw shard `shard` (Parquet rows and tar members) by their retry."""
    parquet = layout.raw_parquet(shard)
    table = pq.read_table(parquet)
    rows = [results[r["key"]].raw if r["key"] in results else r for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), temporary_name(parquet))
    tar = layout.raw_tar(shard)
    with tarfile.open(tar) as old, tarfile.open(temporary_name(tar), "w") as new:
        for member in old:
            if member.name.partition(".")[0] not in results:
                new.addfile(member, old.extractfile(member))
        for key, retried in sorted(results.items()):
            if retried.image is not None:
                _add(new, f"{key}.jpg", retried.image)
                _add(new, f"{key}.json", json.dumps(retried.raw, default=str).encode())
    os.replace(temporary_name(parquet), parquet)
    os.replace(temporary_name(tar), tar)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _fates_of(output: JobOutput, rows: list[FailedRow]) -> list[str]:
    keys_by_shard: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        keys_by_shard[row.shard].add(row.key)
    statuses = []
    for shard, keys in keys_by_shard.items():
        table = output.read_shard(shard).select(["key", "status"])
        statuses += [r["status"] for r in table.to_pylist() if r["key"] in keys]
    return statuses
