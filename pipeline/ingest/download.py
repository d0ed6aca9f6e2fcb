"""Stage 1: download one input shard with img2dataset's per-shard downloader, inside the guards.

Input shard `NNNNN` is the prepared list's `_input/NNNNN.parquet` (`prepared_list`). `ShardDownload`
hands its rows to img2dataset's `Downloader` (its resizer and WebDataset writer, built from the same
arguments `img2dataset.download` takes, `DownloadStage.arguments`), which writes `downloads/NNNNN.tar`
(the resized images), `NNNNN.parquet` (a row per sample, failed ones included, with `status` and
`error_message`) and, last, `NNNNN_stats.json`: the raw shard's done marker. A shard that has one is
not downloaded again. Everything is an fsspec URI (a plain path locally), so the raw shards land on
the output's filesystem, object store included.

Which shard downloads when, on which worker, and what happens to one that hangs, is the runner's
business; this module downloads one shard wherever it is called, and every fetch goes through
`fetch_guard` and every image through `image_guard` while it does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from pipeline.core.resources import Resources
from pipeline.ingest.fetch_guard import FetchGuard
from pipeline.ingest.image_guard import GuardedResizer, ImageGuard
from pipeline.ingest.prepared_list import PreparedList
from pipeline.ingest.url_list import carried_columns
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout

# img2dataset's own statuses, and the message it gives a response refused by its X-Robots-Tag rule.
DOWNLOADED = "success"
UNDECODABLE = "failed_to_resize"
OPT_OUT_ERROR = "Use of image disallowed by X-Robots-Tag directive"


@dataclass(frozen=True)
class DownloadStage:
    """The job's download settings as img2dataset's arguments: what `ShardDownload` builds its
    downloader from, and what the benchmark gives plain `img2dataset.download` to compare."""

    spec: JobSpec
    layout: OutputLayout

    def arguments(self) -> dict:
        """img2dataset.download's arguments for this job (the distributor is the caller's choice)."""
        d = self.spec.download
        return {
            "url_list": self.layout.prepared_input.uri,
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": None,
            "save_additional_columns": carried_columns(self.spec.input),
            "output_folder": self.layout.downloads.uri,
            "output_format": "webdataset",
            "image_size": d.image_size,
            "resize_mode": d.resize_mode,
            "resize_only_if_bigger": True,
            "encode_format": "jpg",
            "encode_quality": 95,
            "timeout": d.timeout,
            "retries": d.retries,
            "thread_count": d.thread_count,
            "processes_count": 1,
            "number_sample_per_shard": self.spec.output.shard_size,
            "oom_shard_count": 5,
            "compute_hash": "sha256",
            "extract_exif": False,
            "user_agent_token": d.user_agent_token,
            "disallowed_header_directives": list(d.disallowed_header_directives),
            "incremental_mode": "incremental",
            "enable_wandb": False,
        }


@dataclass(frozen=True)
class ShardDownload:
    """Download input shard `NNNNN` into `downloads/` (see the module's docstring); idempotent."""

    spec: JobSpec
    layout: OutputLayout
    resources: ClassVar[Resources] = Resources(cpus=1)  # img2dataset resizes on the calling thread

    def done(self, shard: str) -> bool:
        """On disk: img2dataset's stats file (written last) and the rows (gone when
        `output.keep_downloads` is false and the shard was committed; a stale commit downloads again)."""
        return self.layout.raw_stats(shard).exists() and self.layout.raw_parquet(shard).exists()

    def wait_for_input(self, shard: str) -> None:
        """Block until the shard's prepared rows are written: the list is prepared while the first
        shards download. Raises `PrepareFailed` when they never will be."""
        PreparedList(self.layout.prepared_input).wait_for(shard)

    def __call__(self, shard: str) -> None:
        """Raises what img2dataset raised; the runner retries the shard."""
        if self.done(shard):
            return
        rows = PreparedList(self.layout.prepared_input).read(shard)
        staged = self.layout.downloads / "_tmp" / f"{shard}.feather"  # img2dataset's input, removed by it
        staged.parent.mkdir()
        columns = _column_list(self.spec)
        with staged.writing() as stream, pa.ipc.new_file(stream, rows.select(columns).schema) as sink:
            sink.write_table(rows.select(columns))
        guards = _Guards(FetchGuard.of(self.spec.download), ImageGuard.of(self.spec.download))
        _GuardedDownloader(_downloader(self.spec, self.layout), guards)((int(shard), staged.uri))


def _column_list(spec: JobSpec) -> list[str]:
    """The columns img2dataset's reader hands its downloader, in its order: the carried ones, then `url`."""
    return [*carried_columns(spec.input), "url"]


def _downloader(spec: JobSpec, layout: OutputLayout) -> Any:
    """img2dataset's `Downloader` as `img2dataset.download` builds it from `DownloadStage.arguments`."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    a = DownloadStage(spec, layout).arguments()
    resizer = Resizer(
        image_size=a["image_size"],
        resize_mode=a["resize_mode"],
        resize_only_if_bigger=a["resize_only_if_bigger"],
        encode_quality=a["encode_quality"],
        encode_format=a["encode_format"],
    )
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=a["thread_count"],
        save_caption=False,
        extract_exif=a["extract_exif"],
        output_folder=a["output_folder"],
        column_list=_column_list(spec),
        timeout=a["timeout"],
        number_sample_per_shard=a["number_sample_per_shard"],
        oom_shard_count=a["oom_shard_count"],
        compute_hash=a["compute_hash"],
        verify_hash_type=None,
        encode_format=a["encode_format"],
        retries=a["retries"],
        user_agent_token=a["user_agent_token"],
        disallowed_header_directives=a["disallowed_header_directives"] or None,
    )


@dataclass(frozen=True)
class _Guards:
    fetch: FetchGuard
    image: ImageGuard


@dataclass(frozen=True)
class _GuardedDownloader:
    """img2dataset's `Downloader`, run with the guards installed for the duration of a shard."""

    downloader: Any
    guards: _Guards

    def __call__(self, shard: tuple[int, str]) -> None:
        if not isinstance(self.downloader.resizer, GuardedResizer):
            self.downloader.resizer = GuardedResizer(self.downloader.resizer, self.guards.image)
        with self.guards.fetch.installed(), self.guards.image.installed():
            self.downloader.download_shard(shard)  # raises, where `__call__` would print and go on
