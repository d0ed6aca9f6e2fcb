"""A job's output directory as its readers see it: `inspect`, `rethreshold` and `retry-failed`.

The manifest names the job's spec and its shards. Whether a shard is complete is decided by the
shard's own completion marker (written last, carrying the spec's fingerprint), not by the manifest,
so a job that is still running, or died half way, reads correctly: the complete shards are read and
the rest are reported as missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.storage import parquet_file, read_parquet
from pipeline.output.manifest import DONE, FAILED, PENDING
from pipeline.spec.config import JobSpec, SpecError, typed_spec
from pipeline.spec.layout import OutputLayout
from pipeline.spec.records import SCHEMA_VERSION, current_names, embedding_size_of


class OutputError(ValueError):
    """An output directory that cannot be used as asked, as one line that names it."""


@dataclass(frozen=True)
class ShardState:
    name: str
    status: str  # DONE, PENDING or FAILED
    report: dict[str, Any] | None  # the completion marker's report when DONE
    error: str | None  # why, when FAILED


@dataclass(frozen=True)
class JobOutput:
    layout: OutputLayout
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> JobOutput:
        """`path`: a local directory or an fsspec URI (`s3://bucket/job`)."""
        try:
            layout = OutputLayout(path)
            found = layout.root.is_dir()
        except (ImportError, ValueError, OSError) as err:  # unknown scheme, backend not installed, no access
            raise OutputError(f"{path}: cannot open: {' '.join(str(err).split())}") from None
        root = layout.root
        if not found:
            raise OutputError(f"{root}: no such directory")
        if not layout.manifest.is_file():
            raise OutputError(
                f"{root}: no manifest.json: not a capfilt output, or its job stopped before it had read "
                "its URL list"
            )
        try:
            manifest = json.loads(layout.manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise OutputError(f"{layout.manifest}: unreadable: {' '.join(str(err).split())}") from None
        return cls(layout, manifest)

    @property
    def spec(self) -> JobSpec:
        try:
            return typed_spec(self.manifest["spec"])
        except SpecError as err:
            raise OutputError(
                f"{self.layout.manifest}: the job spec it records is not valid: {err}"
            ) from None

    @property
    def threshold(self) -> float:
        return self.spec.filter.threshold

    @property
    def input_rows(self) -> int:
        return int(self.manifest["input_rows"])

    def shards(self) -> list[ShardState]:
        """Every shard of the job, DONE when its completion marker says so, in shard order."""
        states = []
        names = [entry["shard"] for entry in self.manifest["shards"]]
        reports = self.layout.finished_reports(names, self.manifest["fingerprint"])
        for entry in self.manifest["shards"]:
            name = entry["shard"]
            report = reports.get(name)
            if report is not None:
                states.append(ShardState(name, DONE, report, None))
            elif entry["status"] == FAILED:
                states.append(ShardState(name, FAILED, None, entry.get("error")))
            else:
                states.append(ShardState(name, PENDING, None, None))
        return states

    def embedding_size(self) -> int:
        """The size of the image embeddings its shards store, which a shard written again (by
        rethreshold or retry-failed) keeps; the filter checkpoint's, for an output written before
        shards had embeddings."""
        schema = self._stored_schema()
        size = embedding_size_of(schema) if schema is not None else None
        if size is not None:
            return size
        from pipeline.curate.model_check import embedding_size

        return embedding_size(self.spec)

    def has_itc_scores(self) -> bool:
        """Its shards store ITC scores (those written before capfilt did have none to rank by)."""
        schema = self._stored_schema()
        return schema is None or "synthetic_itc" in schema.names

    def _stored_schema(self) -> pa.Schema | None:
        """The Arrow schema of the first shard the manifest lists as written (one footer read, not the
        listing and reports `shards()` reads); None while none is written."""
        done = [entry["shard"] for entry in self.manifest["shards"] if entry["status"] == DONE]
        return parquet_file(self.layout.shard_parquet(done[0])).schema_arrow if done else None

    @property
    def shard_schema(self) -> int:
        """The version of its shards' columns (`records.SCHEMA_VERSION`; 1 before manifests said)."""
        return int(self.manifest.get("shard_schema", 1))

    def read_shard(self, name: str) -> pa.Table:
        """A shard's rows, with this schema's column names (a schema 1 shard's renamed)."""
        table = read_parquet(self.layout.shard_parquet(name))
        return table.rename_columns(current_names(table.column_names))

    def require_current_schema(self, command: str) -> None:
        """`command` rewrites some of the shards in place: refused where that would mix two schemas."""
        if self.shard_schema != SCHEMA_VERSION:
            raise OutputError(
                f"{self.layout.root}: its shards have the columns of shard schema {self.shard_schema}, "
                f"this capfilt writes schema {SCHEMA_VERSION}, and {command} rewrites only some of them; "
                "write it anew first with `capfilt rethreshold OUT --threshold T --out NEW` (every shard "
                "in the new schema, from the stored scores), then run it on NEW"
            )

    def require_complete(self, command: str) -> list[str]:
        """The shard names, all done: `command` needs every shard written (it rewrites the output)."""
        states = self.shards()
        unfinished = [s.name for s in states if s.status != DONE]
        if unfinished:
            raise OutputError(
                f"{self.layout.root}: the job is not complete ({len(unfinished)} of "
                f"{len(self.manifest['shards'])} shards not written, first {unfinished[0]}); "
                f"finish it with `capfilt run` (it resumes), then {command}"
            )
        return [s.name for s in states]

    def require_downloads(self, shards: list[str], command: str) -> None:
        """Every shard's raw download (tar and rows) is there: `command` reads the images of rows
        the output does not hold. From one listing of `downloads/`."""
        present = {p.name for p in self.layout.downloads.files()} if self.layout.downloads.is_dir() else set()
        missing = [s for s in shards if not {p.name for p in self.layout.raw_images_and_rows(s)} <= present]
        if missing:
            raise OutputError(
                f"{self.layout.downloads}: the raw downloads of {len(missing)} of {len(shards)} shards are "
                f"gone (first {missing[0]}; the job ran with output.keep_downloads: false, or they were "
                f"deleted); {command} needs them: run the job again into a new output.path with "
                "output.keep_downloads: true"
            )
