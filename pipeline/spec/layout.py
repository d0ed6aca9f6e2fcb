"""Where a job's files live under `output.path`, and when a shard counts as done.

    _input/NNNNN.parquet     the URL list after the policy check, by input shard (img2dataset's
                             input), and _input/_prepared.json once all of it is
    downloads/NNNNN.tar      raw shards from img2dataset (+ .parquet, _stats.json)
    shards/NNNNN.tar         WebDataset: kept samples only (no tar for a shard that kept none)
    shards/NNNNN.parquet     one row per input row
    shards/NNNNN_stats.json  img2dataset-style counts
    shards/NNNNN.done.json   the shard's report, written last: the completion marker
    shards/sizes.json        samples per tar, with the manifest
    manifest.json            the job's record

`output.path` is a local path or an fsspec URI (`pipeline.core.storage`): every name here is a
`Location` on that filesystem. Every file is written whole (renamed into place on POSIX, uploaded as
one object on an object store) and the marker goes last, so a crash leaves either a complete shard
or one that is redone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.core.storage import Location

RETRY_DIR = "_retry"  # retry-failed's own small job, removed when it has been folded in
# An object-store rethreshold target holds this first, naming its source, and drops it after its manifest.
IN_PROGRESS = ".capfilt-rethreshold"


def shard_name(index: int) -> str:
    """Shard `index`'s name, as img2dataset names its shards (`oom_shard_count` 5)."""
    return f"{index:05d}"


@dataclass(frozen=True, init=False)
class OutputLayout:
    root: Location

    def __init__(self, root: str | os.PathLike[str] | Location) -> None:
        object.__setattr__(self, "root", Location.of(root))

    @property
    def prepared_input(self) -> Location:
        """The prepared URL list's directory (`pipeline.ingest.prepared_list`)."""
        return self.root / "_input"

    @property
    def downloads(self) -> Location:
        return self.root / "downloads"

    @property
    def shards(self) -> Location:
        return self.root / "shards"

    @property
    def logs(self) -> Location:
        """What a run's process printed besides capfilt's console (`job.console`): Ray, img2dataset."""
        return self.root / "logs"

    @property
    def manifest(self) -> Location:
        return self.root / "manifest.json"

    def raw_tar(self, shard: str) -> Location:
        return self.downloads / f"{shard}.tar"

    def raw_parquet(self, shard: str) -> Location:
        return self.downloads / f"{shard}.parquet"

    def raw_stats(self, shard: str) -> Location:
        return self.downloads / f"{shard}_stats.json"

    def raw_images_and_rows(self, shard: str) -> list[Location]:
        """A raw shard's images and rows: deleted once the shard is committed unless
        `output.keep_downloads` (its stats stay); what retry-failed and rethreshold read."""
        return [self.raw_tar(shard), self.raw_parquet(shard)]

    def shard_tar(self, shard: str) -> Location:
        return self.shards / f"{shard}.tar"

    def shard_parquet(self, shard: str) -> Location:
        return self.shards / f"{shard}.parquet"

    def shard_report(self, shard: str) -> Location:
        return self.shards / f"{shard}.done.json"

    def shard_parquets(self) -> list[Location]:
        """The output Parquet files written so far, in shard order."""
        return self.shards.glob("*.parquet")

    def downloaded_shards(self) -> list[str]:
        """Shards img2dataset finished (its stats file is its done marker)."""
        return sorted(p.name.removesuffix("_stats.json") for p in self.downloads.glob("*_stats.json"))

    def finished_reports(self, shards: list[str], fingerprint: str) -> dict[str, dict[str, Any]]:
        """The reports of those `shards` that are complete (Parquet and `done.json` present, and the
        tar where the shard kept a row) and were made by the spec with this fingerprint. From one
        listing of `shards/`, not three lookups per shard: on an object store each lookup is a
        request, and a job has thousands of shards."""
        present = {p.name for p in self.shards.files()}
        found = {}
        for shard in shards:
            if {f"{shard}.done.json", f"{shard}.parquet"} <= present:
                try:
                    report = self.shard_report(shard).read_json()
                except OSError:  # rewritten or removed since the listing (retry-failed does that)
                    continue
                tar_there = f"{shard}.tar" in present or not report["counts"]["kept"]
                if report.get("fingerprint") == fingerprint and tar_there:
                    found[shard] = report
        return found


def write_json_atomically(path: Location, value: Any) -> None:
    """Written whole: renamed into place on POSIX, one object on an object store."""
    path.write_json(value)
