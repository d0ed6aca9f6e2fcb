"""Where a job's files live under `output.path`, and when a shard counts as done.

    _input.parquet           the URL list after the policy check (img2dataset's input)
    downloads/NNNNN.tar      raw shards from img2dataset (+ .parquet, _stats.json)
    shards/NNNNN.tar         WebDataset: kept samples only
    shards/NNNNN.parquet     one row per input row
    shards/NNNNN.done.json   the shard's report, written last: the completion marker
    manifest.json            the job's record

Every file is written under a temporary name and renamed into place, and the marker goes last,
so a crash leaves either a complete shard or one that is redone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    @property
    def prepared_input(self) -> Path:
        return self.root / "_input.parquet"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def raw_tar(self, shard: str) -> Path:
        return self.downloads / f"{shard}.tar"

    def raw_parquet(self, shard: str) -> Path:
        return self.downloads / f"{shard}.parquet"

    def raw_stats(self, shard: str) -> Path:
        return self.downloads / f"{shard}_stats.json"

    def shard_tar(self, shard: str) -> Path:
        return self.shards / f"{shard}.tar"

    def shard_parquet(self, shard: str) -> Path:
        return self.shards / f"{shard}.parquet"

    def shard_report(self, shard: str) -> Path:
        return self.shards / f"{shard}.done.json"

    def shard_parquets(self) -> list[Path]:
        """The output Parquet files written so far, in shard order."""
        return sorted(self.shards.glob("*.parquet"))

    def downloaded_shards(self) -> list[str]:
        """Shards img2dataset finished (its stats file is its done marker)."""
        return sorted(p.name.removesuffix("_stats.json") for p in self.downloads.glob("*_stats.json"))

    def finished_report(self, shard: str, fingerprint: str) -> dict[str, Any] | None:
        """The shard's report if the shard is complete and was made by this spec, else None."""
        marker = self.shard_report(shard)
        if not (marker.exists() and self.shard_tar(shard).exists() and self.shard_parquet(shard).exists()):
            return None
        report = json.loads(marker.read_text())
        return report if report.get("fingerprint") == fingerprint else None


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomically(path: Path, value: Any) -> None:
    write_atomically(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def temporary_name(path: Path) -> Path:
    """The name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp")
