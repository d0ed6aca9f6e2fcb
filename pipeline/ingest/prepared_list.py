"""The prepared URL list on disk, one file per input shard, so that downloads can start while the list
is still being prepared:

    _input/NNNNN.parquet    input shard NNNNN: rows NNNNN * shard_size ..., in order (img2dataset's
                            input; a directory of them is what plain img2dataset reads too)
    _input/_prepared.json   written last: the list's identity, its rows and its repeated URLs
    _input/_failed.json     written instead when preparing failed: why

A shard file is written whole (`Location.writing`), so one that exists is complete. Each carries the
identity in its metadata as well, so that a list whose preparing was cut short still says which
list and settings it was made from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.messages import one_line
from pipeline.core.storage import Location, parquet_file, read_parquet
from pipeline.spec.layout import shard_name

FINGERPRINT_KEY = b"capfilt_fingerprint"  # in each shard file's key-value metadata
RECORD = "_prepared.json"
FAILED = "_failed.json"
_POLL_S = (0.05, 1.0)  # waiting for a shard: first and longest pause between looks


class PrepareFailed(RuntimeError):
    """Preparing the list failed, so the shard waited for will never be written."""


@dataclass(frozen=True)
class PreparedList:
    root: Location

    def shard(self, name: str) -> Location:
        return self.root / f"{name}.parquet"

    @property
    def record(self) -> Location:
        return self.root / RECORD

    @property
    def failed(self) -> Location:
        return self.root / FAILED

    # -- writing (the driver) -------------------------------------------------------------------

    def write_shard(self, index: int, table: pa.Table) -> None:
        with self.shard(shard_name(index)).writing() as stream:
            pq.write_table(table, stream)

    def write_record(
        self, identity: str, rows: int, duplicate_urls: int, settings: dict[str, Any] | None = None
    ) -> None:
        """`settings`: what the identity's fingerprint hashes, for naming a setting that changed."""
        record = {"identity": identity, "rows": rows, "duplicate_urls": duplicate_urls, "settings": settings}
        self.record.write_json(record)

    def fail(self, err: BaseException) -> None:
        self.failed.write_json({"error": one_line(err)})

    # -- reading --------------------------------------------------------------------------------

    def read_record(self) -> dict[str, Any] | None:
        """`identity`, `rows`, `duplicate_urls` and `settings` (null in a record written before they
        were); None before the list is wholly prepared."""
        return self.record.read_json() if self.record.exists() else None

    def shard_identity(self) -> str | None:
        """What a list cut short was made from, by its first shard file; None without one."""
        shards = self.root.glob("*.parquet")
        if not shards:
            return None
        found = (parquet_file(shards[0]).schema_arrow.metadata or {}).get(FINGERPRINT_KEY)
        return None if found is None else found.decode()

    def rows(self) -> int:
        return int(self.record.read_json()["rows"])

    def duplicate_urls(self) -> int | None:
        """How many rows repeat an earlier row's URL; None before the list is wholly prepared."""
        record = self.read_record()
        return None if record is None else int(record["duplicate_urls"])

    def read(self, name: str) -> pa.Table:
        return read_parquet(self.shard(name))

    def wait_for(self, name: str) -> None:
        """Block until shard `name` is written; raise `PrepareFailed` once preparing has failed."""
        pause = _POLL_S[0]
        while not self.shard(name).exists():
            if self.failed.exists():
                reason = self.failed.read_json()["error"]
                raise PrepareFailed(f"the URL list could not be prepared: {reason}")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_S[1])
