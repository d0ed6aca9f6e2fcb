"""The user's URL list, read in any supported format and prepared for img2dataset.

Preparing does four things: it checks the columns before any work starts, gives every row its
policy verdict (`urlpolicy`), counts the rows whose URL came earlier in the list (`duplicates`), and
writes the prepared list (`prepared_list`), whose rows map one-to-one, in order, to img2dataset's
samples, one file per input shard, as it goes: the first shards download while later ones are still
being prepared (`ListPreparation`). A row that must not be fetched gets an empty `url` (img2dataset
fails it at once, without a request) and its verdict travels in `capfilt_*` columns, so it still
comes out of the download as a row of its shard and ends with its own fate. The job's extra input
columns travel the same way, as `capfilt_extra.NAME`, so that no name of the user's can clash with
img2dataset's own columns.
Reading the file, robust to odd rows, is `list_readers`' part.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa

from pipeline.core.messages import one_line, printable
from pipeline.core.storage import Location, parquet_file
from pipeline.ingest.duplicates import DuplicateCounter
from pipeline.ingest.list_readers import UnreadableList, as_strings, batches, column_names
from pipeline.ingest.prepared_list import FINGERPRINT_KEY, PreparedList
from pipeline.ingest.urlpolicy import NetworkPolicy, ascii_url, check_urls
from pipeline.spec.config import InputSpec, SpecError
from pipeline.spec.list_files import ListFilesError, list_files
from pipeline.spec.records import SHARD_SCHEMA

URL = "capfilt_url"
CAPTION = "capfilt_caption"
FATE = "capfilt_fate"
ERROR = "capfilt_error"
CARRIED_COLUMNS = [URL, CAPTION, FATE, ERROR]
EXTRA_PREFIX = "capfilt_extra."

# What reading the list can raise when the file, not a row, is at fault.
_UNREADABLE = (pa.ArrowInvalid, OSError, KeyError, UnicodeDecodeError, UnreadableList)
_COLUMNS_LISTED = 20


def extra_column(name: str) -> str:
    """The prepared (and raw shard) column that carries the input's extra column `name`."""
    return EXTRA_PREFIX + name


def extra_names(columns: Iterable[str]) -> list[str]:
    """The input names of the extra columns among a prepared or raw shard's `columns`, in order."""
    return [c.removeprefix(EXTRA_PREFIX) for c in columns if c.startswith(EXTRA_PREFIX)]


def carried_columns(spec: InputSpec) -> list[str]:
    """The prepared columns img2dataset carries into its shards (`save_additional_columns`)."""
    return [*CARRIED_COLUMNS, *map(extra_column, spec.extra_columns)]


def prepared_schema(spec: InputSpec) -> pa.Schema:
    return pa.schema([(name, pa.string()) for name in ["url", *carried_columns(spec)]])


def read_batches(spec: InputSpec) -> Iterator[pa.RecordBatch]:
    """The URL list, part after part, as record batches of strings, streamed: `url`, `caption` (null
    without a caption column) and each extra column under its prepared name. Bytes that are not UTF-8
    become U+FFFD. A part that lacks a named column is refused when its turn comes, naming it."""
    return _read_parts(spec, *_list_files(spec))


def _read_parts(spec: InputSpec, parts: list[Location], fmt: str) -> Iterator[pa.RecordBatch]:
    captions = [spec.caption_col] if spec.caption_col else []
    wanted = list(dict.fromkeys([spec.url_col, *captions, *spec.extra_columns]))
    names = ["url", "caption", *map(extra_column, spec.extra_columns)]
    for part in parts:
        try:
            if part != parts[0]:
                _check_part_columns(spec, part, fmt)
            for batch in batches(part, fmt, wanted):
                caption = (
                    as_strings(batch.column(spec.caption_col))
                    if spec.caption_col
                    else pa.nulls(batch.num_rows, pa.string())
                )
                extras = [as_strings(batch.column(name)) for name in spec.extra_columns]
                yield pa.RecordBatch.from_arrays(
                    [as_strings(batch.column(spec.url_col)), caption, *extras], names=names
                )
        except _UNREADABLE as err:
            raise _unreadable(part, fmt, err) from None


def check_columns(spec: InputSpec) -> None:
    """Fail before any work when the list cannot be read or lacks a named column, or when an extra
    column would take the name of an output column."""
    for name in spec.extra_columns:
        if name in SHARD_SCHEMA.names:
            raise SpecError(f"input.extra_columns: {name!r} is an output column name")
    parts, fmt = _list_files(spec)
    try:
        _check_part_columns(spec, parts[0], fmt)  # the rest as prepare reaches them: a part is one read
    except _UNREADABLE as err:
        raise _unreadable(parts[0], fmt, err) from None


def _check_part_columns(spec: InputSpec, part: Location, fmt: str) -> None:
    found = column_names(part, fmt)
    if found is None:  # a JSON Lines list without a line: no rows, nothing to check
        return
    named = [("input.url_col", spec.url_col), ("input.caption_col", spec.caption_col)]
    named += [("input.extra_columns", name) for name in spec.extra_columns]
    for key, name in named:
        if name and name not in found:
            raise SpecError(
                f"{key}: column {name!r} not found in {printable(part)} (columns: {_listed(found)})"
            )


class ListPreparation:
    """Preparing the list, in two steps so that it can stream: the constructor decides, before any
    work, how many rows the job has (`rows`) and whether the list is prepared already (`done`);
    `write()` then writes the prepared list shard by shard into `out` (`PreparedList`), while the
    shards written so far are downloaded.

    `fingerprint` covers the spec's input and download settings (the shard size among them); the
    list files' names, sizes and versions are added to it. A list prepared the same way is reused,
    so a resumed job neither re-reads the list nor re-resolves its hosts. A different one is refused
    once anything was `downloaded`: img2dataset would otherwise resume the old downloads as if they
    were the new job's.

    The rows are counted first, so that every shard can be named before the first is written. For a
    Parquet list that is its files' footers; a CSV or JSON Lines list is read through once, which is
    also where a malformed row anywhere in it is refused before any work starts. Then whatever an
    earlier run left in `out` (half a list, or its failure) is removed, before any download looks.
    """

    def __init__(
        self,
        spec: InputSpec,
        policy: NetworkPolicy,
        out: PreparedList,
        shard_size: int,
        fingerprint: str,
        downloaded: bool,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """`settings` are what `fingerprint` hashes (`JobSpec.download_settings`), recorded beside it, so
        that a refusal can name the setting that changed."""
        self.spec, self.policy, self.out, self.shard_size = spec, policy, out, shard_size
        self.settings = dict(settings or {})
        self._parts, self._fmt = _list_files(spec)  # one listing for the identity and the reading
        self.identity = f"{fingerprint}:{_source_identity(self._parts)}"
        self._stop = threading.Event()
        record = _this_lists_record(spec, out, self.identity, downloaded, self.settings)
        if record is not None:
            self.rows, self.done = int(record["rows"]), True
            return
        self.rows, self.done = self._count(), False
        # What an earlier run left (half a list, its failure) goes now, before any download looks.
        out.root.rmtree()

    def _count(self) -> int:
        """The list's rows, every part's columns checked on the way."""
        try:
            for part in self._parts:
                _check_part_columns(self.spec, part, self._fmt)
            if self._fmt == "parquet":
                rows = 0
                for part in self._parts:  # a loop, not sum(): `part` names the one that failed
                    rows += parquet_file(part).metadata.num_rows
                return rows
        except _UNREADABLE as err:
            raise _unreadable(part, self._fmt, err) from None
        return sum(batch.num_rows for batch in _read_parts(self.spec, self._parts, self._fmt))

    def write(self) -> None:
        """Write the prepared shards in order, then the record; a no-op when `done`, and `done` after
        unless stopped. On an error the failure is recorded in `out` too (`PreparedList.failed`),
        for the downloads waiting on a shard that will not come, and raised."""
        if self.done:
            return
        self.out.root.mkdir()  # once, for every file below (an empty list has only its record)
        try:
            self.done = self._write_shards()
        except Exception as err:
            self.out.fail(err)
            raise

    def stop(self) -> None:
        """Stop `write()` at its next batch (the job ended early); the list is prepared again next run."""
        self._stop.set()

    def _write_shards(self) -> bool:
        """True once the record is written; False when stopped before."""
        schema = prepared_schema(self.spec).with_metadata({FINGERPRINT_KEY: self.identity.encode()})
        pending: list[pa.RecordBatch] = []
        held = shard = rows = 0
        with DuplicateCounter() as repeats:
            for batch in _read_parts(self.spec, self._parts, self._fmt):
                while batch.num_rows:  # checked a shard's worth at a time: shard 00000 goes first
                    if self._stop.is_set():
                        return False
                    piece, batch = batch.slice(0, self.shard_size - held), batch.slice(self.shard_size - held)
                    rows += piece.num_rows
                    if rows > self.rows:
                        raise SpecError(self._changed(f"more than {self.rows}"))
                    urls = piece.column("url").to_pylist()
                    repeats.add(urls)
                    pending.append(_prepared(piece, urls, self.policy, schema))
                    held += piece.num_rows
                    if held == self.shard_size:
                        self.out.write_shard(shard, pa.Table.from_batches(pending, schema))
                        pending, held, shard = [], 0, shard + 1
            if rows != self.rows:
                raise SpecError(self._changed(str(rows)))
            if held:
                self.out.write_shard(shard, pa.Table.from_batches(pending, schema))
            self.out.write_record(self.identity, rows, repeats.count(), self.settings)
        return True

    def _changed(self, read: str) -> str:
        return (
            f"input.url_list: {printable(self.spec.url_list)} changed while it was read: "
            f"{self.rows} rows counted, then {read} read; run the job again"
        )


def _prepared(
    batch: pa.RecordBatch, urls: list[str | None], policy: NetworkPolicy, schema: pa.Schema
) -> pa.RecordBatch:
    """A batch of `prepared_schema`: the URL to fetch ("" for a row that must not be), the row as
    given, its verdict."""
    verdicts = check_urls(urls, policy)
    fetch = ["" if v is not None or u is None else ascii_url(u) for u, v in zip(urls, verdicts, strict=True)]
    arrays = [
        pa.array(fetch, pa.string()),
        batch.column("url"),
        batch.column("caption"),
        pa.array([None if v is None else v.fate.value for v in verdicts], pa.string()),
        pa.array([None if v is None else v.error for v in verdicts], pa.string()),
        *batch.columns[2:],
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def refuse_other_downloads(
    spec: InputSpec, out: PreparedList, fingerprint: str, downloaded: bool, settings: Mapping[str, Any]
) -> None:
    """`ListPreparation`'s refusal alone, read-only and without counting the list: a run makes it
    before it loads the models, so a changed setting is named in a second, not after them."""
    identity = f"{fingerprint}:{_source_identity(_list_files(spec)[0])}"
    _this_lists_record(spec, out, identity, downloaded, dict(settings))


def _this_lists_record(
    spec: InputSpec, out: PreparedList, identity: str, downloaded: bool, settings: dict[str, Any]
) -> dict[str, Any] | None:
    """The prepared list's record when it was prepared as this job prepares it, else None; refused
    when another preparation's downloads are there."""
    record = out.read_record()
    if record is not None and record["identity"] == identity:
        return record
    found = record["identity"] if record is not None else out.shard_identity()
    if found not in (None, identity) and downloaded:
        made = _what_changed(spec, record, settings)
        raise SpecError(
            f"output.path: {out.root.parent} holds downloads made {made}; use a new output.path (or "
            "delete its downloads/ and _input/), or set it back"
        )
    return None


def _what_changed(spec: InputSpec, record: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    """How the downloads' settings differ from this job's: each setting that changed with both
    values, or the list's files; generic for a list recorded before settings were."""
    before = (record or {}).get("settings")
    if not before or not settings:
        return "from another URL list or other input or download settings"
    old, new = _flat(before), _flat(settings)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    changed = [f"{k} was {printable(repr(old.get(k)))}, is {printable(repr(new.get(k)))} now" for k in keys]
    if changed:
        return "with other settings: " + "; ".join(changed)
    return f"from other files of input.url_list ({printable(spec.url_list)}: names, sizes or versions)"


def _source_identity(parts: list[Location]) -> str:
    """Name, size and version (local: mtime; object store: ETag) of each of the URL list's files: an
    edited, added or removed part is a different input. (One part alone keeps its earlier identity.)"""
    if len(parts) == 1:
        return parts[0].identity()
    return hashlib.sha256("\n".join(f"{p.path}:{p.identity()}" for p in parts).encode()).hexdigest()


def _list_files(spec: InputSpec) -> tuple[list[Location], str]:
    try:
        return list_files(spec.url_list, spec.input_format)
    except ListFilesError as err:
        raise SpecError(str(err)) from None


def _listed(names: list[str]) -> str:
    shown = ", ".join(printable(n) for n in names[:_COLUMNS_LISTED]) or "none"
    return shown + (f" and {len(names) - _COLUMNS_LISTED} more" if len(names) > _COLUMNS_LISTED else "")


def _unreadable(part: Location, fmt: str, err: Exception) -> SpecError:
    reason = printable(one_line(err))
    return SpecError(f"input.url_list: cannot read {printable(part)} as {fmt}: {reason}")


def _shown(value: Any) -> str:
    return printable(repr(value))


def _flat(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`{"input": {"url_col": "url"}, "shard_size": 16}` as `{"input.url_col": "url",
    "output.shard_size": 16}`: each setting under the name a spec gives it."""
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            flat[f"output.{name}"] = value  # shard_size, the one setting outside input and download
    return flat
