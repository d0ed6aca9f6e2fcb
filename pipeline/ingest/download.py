"""Stage 1: download the prepared URL list with img2dataset, distributed on the job's Ray.

img2dataset writes `downloads/NNNNN.tar` (WebDataset of the resized images), `NNNNN.parquet` (a
row per sample, failed ones included, with `status` and `error_message`) and `NNNNN_stats.json`,
its done marker: re-running skips shards that have one (`incremental_mode`). Shard `i` holds rows
`i * shard_size ...` of `_input.parquet`, in order. Both are given to img2dataset as fsspec URIs
(plain paths locally), which it opens itself: on an object store its incremental mode lists the
stats files there, and its `_tmp` staging directory lives under `downloads/` too.

img2dataset's distributor sends its `Downloader` to each worker; capfilt hands it over wrapped
(`_GuardedDownloader`), so that on the worker, for the duration of a shard, every fetch goes through
`fetch_guard` and every image through `image_guard`.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.ingest.fetch_guard import FetchGuard
from pipeline.ingest.image_guard import GuardedResizer, ImageGuard
from pipeline.ingest.url_list import carried_columns
from pipeline.spec.config import JobSpec
from pipeline.spec.layout import OutputLayout

# img2dataset's own statuses, and the message it gives a response refused by its X-Robots-Tag rule.
DOWNLOADED = "success"
UNDECODABLE = "failed_to_resize"
OPT_OUT_ERROR = "Use of image disallowed by X-Robots-Tag directive"


@dataclass(frozen=True)
class DownloadStage:
    spec: JobSpec
    layout: OutputLayout

    def arguments(self) -> dict:
        """img2dataset.download's arguments for this job (the distributor is the runner's choice)."""
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

    def run(self, distributor: str) -> None:
        import img2dataset

        guards = _Guards(FetchGuard.of(self.spec.download), ImageGuard(self.spec.download.max_image_pixels))
        with _keep_sigint_handler(), _guarded_distributors(guards):
            try:
                img2dataset.download(**self.arguments(), distributor=distributor)
            except SystemExit as exit_:  # img2dataset's SIGINT handler exits with status 0
                raise KeyboardInterrupt("download interrupted") from exit_


@dataclass(frozen=True)
class _Guards:
    fetch: FetchGuard
    image: ImageGuard


@dataclass(frozen=True)
class _GuardedDownloader:
    """img2dataset's `Downloader`, run with the guards installed in the worker that runs it."""

    downloader: Any
    guards: _Guards

    def __call__(self, shard: Any) -> Any:
        if not isinstance(self.downloader.resizer, GuardedResizer):
            self.downloader.resizer = GuardedResizer(self.downloader.resizer, self.guards.image)
        with self.guards.fetch.installed(), self.guards.image.installed():
            return self.downloader(shard)


# img2dataset.download picks its distributor function by name from its `main` module, each called
# as fn(processes_count, downloader, reader, subjob_size, max_shard_retry).
_DISTRIBUTORS = ("ray_distributor", "multiprocessing_distributor")


@contextlib.contextmanager
def _guarded_distributors(guards: _Guards) -> Iterator[None]:
    """While img2dataset.download runs here, its distributors ship the guarded downloader."""
    img2dataset_main = importlib.import_module("img2dataset.main")  # the package's `main` is a function

    originals = {name: getattr(img2dataset_main, name) for name in _DISTRIBUTORS}

    def guarded(original: Callable[..., Any]) -> Callable[..., Any]:
        def distribute(processes_count: int, downloader: Any, *rest: Any) -> Any:
            return original(processes_count, _GuardedDownloader(downloader, guards), *rest)

        return distribute

    for name, original in originals.items():
        setattr(img2dataset_main, name, guarded(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(img2dataset_main, name, original)


@contextlib.contextmanager
def _keep_sigint_handler() -> Iterator[None]:
    """img2dataset installs a SIGINT handler that exits with status 0; a later Ctrl-C must not."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
