"""The user's URL list, read in any supported format and prepared for img2dataset.

Preparing does three things: it checks the columns before any work starts, gives every row its
policy verdict (`urlpolicy`), and writes `_input.parquet`, whose rows map one-to-one, in order, to
img2dataset's samples. A row that must not be fetched gets an empty `url` (img2dataset fails it at
once, without a request) and its verdict travels in `capfilt_*` columns, so it still comes out of
the download as a row of its shard and ends with its own fate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.config import InputSpec, SpecError
from pipeline.storage import Location, parquet_file
from pipeline.urlpolicy import NetworkPolicy, check_urls

URL = "capfilt_url"
CAPTION = "capfilt_caption"
FATE = "capfilt_fate"
ERROR = "capfilt_error"
CARRIED_COLUMNS = [URL, CAPTION, FATE, ERROR]
FINGERPRINT_KEY = b"capfilt_fingerprint"

PREPARED_SCHEMA = pa.schema([(name, pa.string()) for name in ["url", *CARRIED_COLUMNS]])

_BATCH_ROWS = 65536


def read_batches(spec: InputSpec) -> Iterator[pa.RecordBatch]:
    """The URL list as record batches of (url, caption) strings, streamed."""
    columns = [spec.url_col] + ([spec.caption_col] if spec.caption_col else [])
    for batch in _raw_batches(spec, columns):
        arrays = [_as_strings(batch.column(name)) for name in columns]
        if not spec.caption_col:
            arrays.append(pa.nulls(batch.num_rows, pa.string()))
        yield pa.RecordBatch.from_arrays(arrays, names=["url", "caption"])


def check_columns(spec: InputSpec) -> None:
    """Fail before any work when the list cannot be read or lacks a named column."""
    found = _column_names(spec)
    for key, name in (("input.url_col", spec.url_col), ("input.caption_col", spec.caption_col)):
        if name and name not in found:
            raise SpecError(
                f"{key}: column {name!r} not found in {spec.url_list} (columns: {', '.join(found) or 'none'})"
            )


def prepare(spec: InputSpec, policy: NetworkPolicy, out: Location, fingerprint: str, downloaded: bool) -> int:
    """Write img2dataset's input list to `out`; return the number of input rows.

    `fingerprint` covers the spec's input and download settings; the URL list's size and time
    are added to it. A file made the same way is reused, so a resumed job neither re-reads the
    list nor re-resolves its hosts. A different one is refused once anything was `downloaded`:
    img2dataset would otherwise resume the old downloads as if they were the new job's.
    """
    identity = f"{fingerprint}:{_source_identity(spec)}".encode()
    if out.exists():
        existing = parquet_file(out)
        if (existing.schema_arrow.metadata or {}).get(FINGERPRINT_KEY) == identity:
            return existing.metadata.num_rows
        if downloaded:
            raise SpecError(
                f"output.path: {out.parent} holds downloads made from another URL list or other input or "
                "download settings; use a new output.path (or delete its downloads/ and _input.parquet)"
            )
    schema = PREPARED_SCHEMA.with_metadata({FINGERPRINT_KEY: identity})
    rows = 0
    with out.writing() as stream, pq.ParquetWriter(stream, schema) as writer:
        for batch in read_batches(spec):
            urls = batch.column("url").to_pylist()
            verdicts = check_urls(urls, policy)
            writer.write_batch(
                pa.RecordBatch.from_pylist(
                    [
                        {
                            "url": "" if v is not None else u.strip(),
                            URL: u,
                            CAPTION: c,
                            FATE: v.fate.value if v is not None else None,
                            ERROR: v.error if v is not None else None,
                        }
                        for u, c, v in zip(urls, batch.column("caption").to_pylist(), verdicts, strict=True)
                    ],
                    schema=schema,
                )
            )
            rows += batch.num_rows
    return rows


def _source_identity(spec: InputSpec) -> str:
    """Size and version (local: mtime; object store: ETag) of the URL list: an edited list is a
    different input."""
    return Location.of(spec.url_list).identity()


def _raw_batches(spec: InputSpec, columns: list[str]) -> Iterator[pa.RecordBatch]:
    source = Location.of(spec.url_list)
    try:
        if spec.input_format == "parquet":
            yield from parquet_file(source).iter_batches(batch_size=_BATCH_ROWS, columns=columns)
            return
        with _readable(source) as stream:
            if spec.input_format in ("csv", "tsv"):
                reader = pa_csv.open_csv(
                    stream,
                    parse_options=_csv_options(spec),
                    convert_options=pa_csv.ConvertOptions(
                        include_columns=columns, column_types=dict.fromkeys(columns, pa.string())
                    ),
                )
                yield from reader
            else:
                yield from pa_json.read_json(stream).select(columns).to_batches(_BATCH_ROWS)
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise _unreadable(spec, err) from None


def _column_names(spec: InputSpec) -> list[str]:
    source = Location.of(spec.url_list)
    try:
        if spec.input_format == "parquet":
            return parquet_file(source).schema_arrow.names
        with _readable(source) as stream:
            if spec.input_format in ("csv", "tsv"):
                return pa_csv.open_csv(stream, parse_options=_csv_options(spec)).schema.names
            return pa_json.read_json(stream).schema.names
    except (pa.ArrowInvalid, OSError) as err:
        raise _unreadable(spec, err) from None


@contextlib.contextmanager
def _readable(source: Location) -> Iterator[Any]:
    """What pyarrow's CSV/JSON readers get: the path locally (they infer compression from the name,
    as before), else an fsspec stream that decompresses by the name the same way."""
    if source.local:
        yield source.path
        return
    with source.fs.open(source.path, "rb", compression="infer") as stream:
        yield stream


def _csv_options(spec: InputSpec) -> pa_csv.ParseOptions:
    return pa_csv.ParseOptions(delimiter="\t" if spec.input_format == "tsv" else ",")


def _as_strings(column: pa.Array) -> pa.Array:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def _unreadable(spec: InputSpec, err: Exception) -> SpecError:
    reason = " ".join(str(err).split())
    return SpecError(f"input.url_list: cannot read {spec.url_list} as {spec.input_format}: {reason}")
