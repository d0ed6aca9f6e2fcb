"""`capfilt retry-failed OUT`: download again only the rows whose fate is `download_failed`, caption and
filter them, and fold them into OUT, so that the counts stay exact and no key appears twice.

The failed rows become the URL list of a small job run in `OUT/_retry` with the job's own download,
captioner and filter settings, through the same runner. Then every shard that had failed rows is
patched in two steps:

1. its raw shard (`downloads/NNNNN.parquet` and `.tar`) takes the retried rows' download results under
   their original keys, as if they had downloaded the first time (idempotent);
2. its output shard is written again by the job's `ShardWriter`, from the scores it already stores
   plus the retried rows' scores. No image that was already scored goes through the models again.
   Its stored dedup decisions stand; a retried row that the keep rule keeps is decided against every
   image the job kept, in every shard (it is decided after them), and against the retried rows
   before it.

The writer takes the shard's done marker away before it rewrites, so a retry interrupted in step 2
leaves that shard unfinished, never "done" with stale counts: `capfilt run` then redoes it from its
patched raw shard (the retried downloads are kept), and the manifest is exact again.

Memory holds one original shard and one retry shard at a time, whatever the number of failed rows
(a third of a web crawl's URLs can be dead): the URL list is written shard by shard, and the retry
job's shards are read in order as the fold walks the original shards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.storage import Location, read_parquet
from pipeline.core.tars import read_jpegs
from pipeline.curate.dedup import DuplicateIndex
from pipeline.job.console import Console, captured
from pipeline.job.output_guard import lock_output
from pipeline.job.runner import JobResult, run_job
from pipeline.output.job_output import JobOutput, OutputError
from pipeline.output.manifest import build_manifest, check_accounting, write_manifest
from pipeline.output.shard_writer import Scores, ShardWriter, scores_from_records, stored_kept_images
from pipeline.spec.config import InputSpec, JobSpec, OutputSpec
from pipeline.spec.fates import Fate, add_counts, count_fates
from pipeline.spec.layout import RETRY_DIR, OutputLayout

Log = Callable[[str], None]


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
    output: JobOutput, address: str | None = None, log: Log = print, console: Console | None = None
) -> RetryResult:
    """Retry OUT's failed downloads and fold them in, holding OUT's lock (`output_guard`) throughout:
    a `capfilt run` or another retry writing OUT at the same time is refused, and this one waits for
    neither. With a `console`, the retry job runs as `capfilt run` does, its log in OUT's."""
    log = console.say if console else log
    with lock_output(output.layout.root, log=log):
        shards = output.require_complete("retry its failed downloads")
        output.require_current_schema("retry-failed")
        spec = output.spec
        work = output.layout.root / RETRY_DIR
        work.rmtree()
        work.mkdir()
        plan = _write_failed_list(output, shards, work / "urls.parquet")
        retried = sum(n for _, n in plan)
        try:  # only the shards that get rows back need their raw downloads
            output.require_downloads(
                [shard for shard, _ in plan], "retry-failed (it patches the retried rows into them)"
            )
        except OutputError:
            work.rmtree()
            raise
        fates = count_fates([])
        if retried:
            log(f"capfilt: retrying {retried} rows whose download failed")
            with captured(console, output.layout, spec.fingerprint()):
                job = _run_retry_job(output, spec, work, address, log, console)
            results = _RetryJob(job, spec.output.shard_size)
            writer = ShardWriter.of(spec, output.layout, output.embedding_size())
            index = _kept_so_far(output, shards)
            start = 0
            for shard, n in plan:
                failed = _failed_rows(output, shard)
                rows = {r["key"]: results.row(start + i, r["key"], r["url"]) for i, r in enumerate(failed)}
                start += n
                _patch_raw_shard(output.layout, shard, rows)
                records = output.read_shard(shard).to_pylist()
                scored = {key: r.scores for key, r in rows.items() if r.scores}
                duplicates = index.decide(writer.kept_images(scored)) | _duplicates_in(records)
                writer.write(shard, scores_from_records(records) | scored, duplicates)
                now = output.read_shard(shard).select(["key", "status"]).to_pylist()
                fates = add_counts(fates, count_fates(r["status"] for r in now if r["key"] in rows))
        work.rmtree()
        reports = output.layout.finished_reports(shards, spec.fingerprint())
        manifest = build_manifest(spec, output.input_rows, shards, reports, {})
        write_manifest(output.layout, manifest)
        check_accounting(manifest)
        return RetryResult(manifest, retried, fates)


def _kept_so_far(output: JobOutput, shards: list[str]) -> DuplicateIndex:
    """Dedup's index of every image the job kept: retried rows are decided against all of them, the
    shards after theirs included, as a row decided after those shards."""
    index = DuplicateIndex(output.spec.filter.dedup, output.embedding_size())
    if index.active:
        for shard in shards:
            index.add_originals(stored_kept_images(output.layout.shard_parquet(shard)))
    return index


def _duplicates_in(records: list[dict[str, Any]]) -> dict[str, str]:
    """The dedup decisions a shard stores: they stand when its other rows are retried."""
    return {r["key"]: r["duplicate_of"] for r in records if r["status"] == Fate.DUPLICATE_IMAGE}


def _failed_rows(output: JobOutput, shard: str) -> list[dict[str, Any]]:
    """The shard's download_failed rows (key, url, web caption and the extra input columns), in key order."""
    extra = output.spec.input.extra_columns
    table = output.read_shard(shard).select(["key", "url", "web_caption", "status", *extra])
    return table.filter(pc.equal(table["status"], Fate.DOWNLOAD_FAILED.value)).to_pylist()


def _write_failed_list(output: JobOutput, shards: list[str], path: Location) -> list[tuple[str, int]]:
    """Write every shard's failed rows, in shard and key order, as the retry job's URL list; return
    (shard, failed rows) for the shards that have any."""
    plan = []
    # The extra columns ride along, so the retried rows carry them into the raw shard they are patched into.
    columns = ["url", "web_caption", *output.spec.input.extra_columns]
    schema = pa.schema([(name, pa.string()) for name in columns])
    with path.writing() as stream, pq.ParquetWriter(stream, schema) as sink:
        for shard in shards:
            failed = _failed_rows(output, shard)
            if failed:
                sink.write_table(pa.Table.from_pylist(failed, schema=schema))
                plan.append((shard, len(failed)))
    return plan


def _run_retry_job(
    output: JobOutput, spec: JobSpec, work: Location, address: str | None, log: Log, console: Console | None
) -> JobResult:
    retry_spec = dataclasses.replace(
        spec,
        input=InputSpec(
            url_list=(work / "urls.parquet").uri,
            input_format="parquet",
            url_col="url",
            caption_col="web_caption",
            extra_columns=spec.input.extra_columns,
        ),
        # Kept: the retried rows' images are patched from its raw shards into OUT's.
        output=OutputSpec(path=(work / "output").uri, shard_size=spec.output.shard_size, keep_downloads=True),
    )
    result = run_job(retry_spec, address=address, log=log, console=console)
    if not result.complete:
        raise OutputError(
            f"{output.layout.root}: the retry job did not complete (see {result.layout.manifest}); "
            "the output is unchanged; run retry-failed again"
        )
    return result


@dataclass(frozen=True)
class _RetryShard:
    number: int
    records: list[dict[str, Any]]  # in key order, that is in URL-list order
    raw: dict[str, dict[str, Any]]  # img2dataset's rows by key
    images: dict[str, bytes]


class _RetryJob:
    """The retry job's rows by position in its URL list, read one retry shard at a time.

    Row i of the URL list is row i % shard_size, in key order, of shard i // shard_size: img2dataset
    keys follow the list's order. Each row's URL is checked against the row it should be."""

    def __init__(self, result: JobResult, shard_size: int) -> None:
        self.layout = result.layout
        self.names = [s["shard"] for s in result.manifest["shards"]]
        self.shard_size = shard_size
        self._shard: _RetryShard | None = None

    def row(self, index: int, key: str, url: str) -> RetriedRow:
        """The retry of URL-list row `index`, under the original `key`."""
        number, position = divmod(index, self.shard_size)
        shard = (
            self._shard if self._shard is not None and self._shard.number == number else self._load(number)
        )
        record = shard.records[position]
        if record["url"] != url:
            raise RuntimeError(
                f"retry row {record['key']} is {record['url']!r}, expected {url!r} (key {key})"
            )
        scores = scores_from_records([record]).get(record["key"])
        return RetriedRow({**shard.raw[record["key"]], "key": key}, scores, shard.images.get(record["key"]))

    def _load(self, number: int) -> _RetryShard:
        name = self.names[number]
        records = sorted(read_parquet(self.layout.shard_parquet(name)).to_pylist(), key=lambda r: r["key"])
        raw = {r["key"]: r for r in read_parquet(self.layout.raw_parquet(name)).to_pylist()}
        self._shard = _RetryShard(number, records, raw, read_jpegs(self.layout.raw_tar(name)))
        return self._shard


def _patch_raw_shard(layout: OutputLayout, shard: str, results: dict[str, RetriedRow]) -> None:
    """Replace the retried rows of raw shard `shard` (Parquet rows and tar members) by their retry.

    The tar goes first: until the Parquet follows, the tar holds images the Parquet does not name
    yet, which nothing reads; never the other way round (a downloaded row without its image). Each
    file is written whole; on an object store, where two files cannot be swapped at once, this order
    is what keeps an interrupted patch readable, and running retry-failed again redoes it."""
    tar = layout.raw_tar(shard)
    with (
        tar.open("rb") as source,
        tarfile.open(fileobj=source) as old,
        tar.writing() as sink,
        tarfile.open(fileobj=sink, mode="w") as new,
    ):
        for member in old:
            if member.name.partition(".")[0] not in results:
                new.addfile(member, old.extractfile(member))
        for key, retried in sorted(results.items()):
            if retried.image is not None:
                _add(new, f"{key}.jpg", retried.image)
                _add(new, f"{key}.json", json.dumps(retried.raw, default=str).encode())
    parquet = layout.raw_parquet(shard)
    table = read_parquet(parquet)
    rows = [results[r["key"]].raw if r["key"] in results else r for r in table.to_pylist()]
    with parquet.writing() as stream:
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), stream)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))
